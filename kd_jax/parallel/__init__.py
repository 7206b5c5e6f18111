"""Parallelism: the device mesh and the one logical-axis table (`mesh`), and what each process
of a multi-host run holds and feeds (`hosts`). jax and numpy only."""
