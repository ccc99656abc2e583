"""Sequences -> rows.

    options.py   EmbedOptions: one typed, documented options object
    batching.py  pure token-budget planning and long-sequence windows (no torch)
    budget.py    the token budget: "auto" sized from free CUDA memory, OOM remembered
    batch.py     one launch's inputs built on the host, copied to the device once
    pooling.py   pooling a launch by segment on the device, one copy back, per-sequence fold
    embed.py     validate, dedupe, batch, forward (models/), pool, check
"""
