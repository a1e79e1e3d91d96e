"""Training: the loop and its parts (step, state, progress, evaluation, checkpoints, recovery), optimizer,
parallelism, logs."""
