"""trainer: TRL training steered by events; a TrainerCallback is its only bridge to the bus."""
