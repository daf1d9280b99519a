"""evaluator: runs the protocol suite on checkpoints and publishes one verdict per request."""
