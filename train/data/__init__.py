"""Training data: the image datasets (digits built in; CelebA, LSUN church, SVHN from --data-root) and
the order in which a run visits them (a function of seed, step and rank only)."""
