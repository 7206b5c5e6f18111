"""kd_jax: knowledge distillation in JAX.

The package reads as the pipeline: config -> data -> teacher -> losses -> step -> loop ->
checkpoint -> evaluate/report; `cli` only parses, validates and calls.
"""

__version__ = "0.1.0"
