"""Sequences -> rows.

    options.py   EmbedOptions: one typed, documented options object
    batching.py  pure token-budget planning and long-sequence windows (no torch)
    embed.py     validate, dedupe, batch, forward (models/), pool, check
"""
