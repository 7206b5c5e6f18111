"""Model definitions (pure), and Hugging Face checkpoints in and out (`pretrained`)."""


def load_pretrained(path, dtype: str = "float32"):
    """A Hugging Face checkpoint directory as a callable: int token ids [batch, seq] (numpy or
    jax) -> float32 logits [batch, seq, vocab]. See `kd_jax.models.pretrained.load_pretrained`."""
    from kd_jax.models.pretrained import load_pretrained as load

    return load(path, dtype)
