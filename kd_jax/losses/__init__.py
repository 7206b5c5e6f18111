"""Losses: divergences between distributions (`divergences`), the teacher's soft targets and
their divergence from the student (`soft_targets`), and the training objective (`objective`).
Pure: jax and numpy only."""
