"""The teacher as the step sees it: online (`online`, a frozen model run inside the step) or from
a cache (`cached`); the cache's sparse targets computed from logits (`sparse`); loading a
teacher run (`loading`)."""
