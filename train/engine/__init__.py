"""The training engine every job and study shares (ALGORITHMS §1, §3): the typed config and its schema,
the training loop, the objectives, the networks, checkpoints, the run folder, distributed plumbing,
the command-line pieces and the errors."""
