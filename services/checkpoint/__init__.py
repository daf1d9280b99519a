"""checkpoint: catalogue, integrity, evaluation requests and the final export."""
