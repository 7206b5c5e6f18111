"""Models: the Llama-family decoder (`transformer`) and models as pure functions of their
parameters (`pure`). Pure: jax, flax and numpy only, no file I/O."""
