"""Data: tokenizers, documents, packing into rows, the batch of any step, prefetch.

Host-side numpy; imports no JAX. `datasets` and `tokenizers` are imported inside the functions
that need them, so the built-in demo (the interpreter's own standard library, byte-level tokens)
runs on a bare image.
"""
