"""Evaluation in the layout of Ghimire et al. Table 1 (ALGORITHMS §2, §7): the table spec, drawing samples
for its cells, the Fréchet-distance evaluation, its reference statistics (digits-FD, FID), the report
with its paired verdicts, and the figures."""
