"""Training RLAN: losses, schedules, checkpoints and the loop."""
