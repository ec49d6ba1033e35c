"""Training: optimizer and schedule, loss, the jitted train step, checkpoints, metrics, the loop."""
