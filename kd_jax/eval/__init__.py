"""Evaluation: statistics on device (`metrics`, pure), held-out evaluation (`evaluate`), and the
report and its tables (`report`)."""
