"""Runs: the run builder (`builder`), the fused step (`step`), the training loop (`loop`), the
teacher pass of offline distillation (`precompute`), preemption and progress."""
