"""evaluator: scores checkpoints by the run's task declaration and publishes one verdict per request."""
