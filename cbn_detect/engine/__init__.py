"""Training loop, optimisation schedule, checkpoints and the run's runtime settings."""
