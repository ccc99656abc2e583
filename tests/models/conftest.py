"""The fast engine's tests share their tiny models: fair-esm's ESM2 beside the engine built
from it, for several architectures."""

from __future__ import annotations

import pytest
from esm.model.esm2 import ESM2

from esm2_batch.models.esm2_fast import FastESM2
from tests.fakes.tiny_esm import build_random_esm2

ARCHITECTURES = [  # (layers, embed_dim, heads, token_dropout)
    (1, 32, 2, True),  # head_dim 16: the scaling is a power of two
    (2, 72, 3, True),  # head_dim 24, as in ESM2-35M: the folded scaling rounds
    (3, 40, 5, False),  # head_dim 8, no token dropout
    (2, 60, 5, True),  # head_dim 12
]

@pytest.fixture(scope="module", params=ARCHITECTURES, ids=lambda a: "L{}-E{}-H{}-td{}".format(*a))
def pair(request: pytest.FixtureRequest) -> tuple[ESM2, FastESM2]:
    layers, dim, heads, token_dropout = request.param
    module = build_random_esm2(num_layers=layers, embed_dim=dim, heads=heads, seed=layers,
                               token_dropout=token_dropout).eval()
    module = round_inv_freq(module)
    return module, FastESM2.from_fair_esm(module)


def round_inv_freq(module: ESM2) -> ESM2:
    """Round the rotary frequencies through fp16, as in the published checkpoints (ESM2
    was trained in fp16): fair-esm's forward uses them, so the engine must too."""
    for layer in module.layers:
        layer.self_attn.rot_emb.inv_freq.copy_(layer.self_attn.rot_emb.inv_freq.half())
    return module
