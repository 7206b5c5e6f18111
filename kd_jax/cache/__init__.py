"""The teacher-logit cache on disk: its manifest, the codec of its values, its shards, reading
them back, what a cache is checked against, and `kd-jax cache import`. numpy and the standard
library only: a cache can be written, checked and read on any host."""
