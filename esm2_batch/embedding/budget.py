"""The token budget: sized from the device's free memory ("auto"), and what an
out-of-memory taught, remembered for the batches after it.

A fixed 4,096 tokens wastes an H100 (it holds 30x that at 650M) and a guessed large one
overflows a small card. ``toks_per_batch="auto"`` (`AUTO_TOKENS`; the default) asks for:

- on CUDA, ``(free memory * FREE_FRACTION - RESERVE_BYTES) / bytes per token``, capped at
  `MAX_AUTO_TOKENS` (beyond ~128k tokens a batch is hundreds of proteins: no faster, and
  every batch's rows arrive later) and never below one longest sequence. Free memory is
  ``torch.cuda.mem_get_info`` plus what the caching allocator holds unused. Bytes per
  token (`bytes_per_token`) count one layer's working set in the compute dtype (the
  residual stream, LayerNorm output, QKV, attention inputs and output, the MLP's
  intermediate before and after GELU), the kept states of every requested layer, the
  pooling's fp32 copies, and for engines that attend over padded (B, T, T) scores
  (fair-esm's reference, ESM C) the fp32 scores and probabilities of the longest
  sequence. Sized once per loaded model (the allocator's cache would make a second
  reading smaller) and recorded in the output's meta (`budget_meta`);
- elsewhere, `CPU_TOKENS` (on CPU larger batches are no faster: the engine works through
  a batch in cache-sized chunks anyway).

After a CUDA out-of-memory the embedder halves the failed batch until the pieces fit;
`overflowed` lowers the launch limit to half the failed launch (at most the size that
then fit), and every later launch, in this call or a later one on the same model, is cut
to it (`launch_limit`): one overflow, not one per batch. A sequence that fails alone does
not lower the limit (the failure is its own, not the batch size's).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from esm2_batch.embedding.batching import SPECIAL_TOKENS
from esm2_batch.embedding.options import AUTO_TOKENS, EmbedOptions
from esm2_batch.models import LoadedModel

__all__ = ["AUTO_TOKENS", "CPU_TOKENS", "MAX_AUTO_TOKENS", "AutoSize", "as_requested",
           "budget_meta", "bytes_per_token", "launch_limit", "overflowed", "sized"]

CPU_TOKENS = 4096
"""The budget "auto" gives off CUDA (the CLI's fixed default before "auto")."""
MAX_AUTO_TOKENS = 1 << 17
"""The most tokens "auto" plans per batch, whatever the free memory."""
FREE_FRACTION = 0.8
"""Share of the free memory a batch may use: the allocator rounds and fragments."""
RESERVE_BYTES = 512 << 20
"""Kept free besides: CUDA kernels' workspaces (cuBLAS, the attention kernels)."""
ACTIVATION_WIDTHS = 16
"""Widths of E live per token inside one layer at its peak (module docstring): stream 1,
LayerNorm 1, QKV 3, attention inputs and output 3, MLP 4 + 4 (fc1 and GELU)."""
POOLING_WIDTHS = 3
"""fp32 copies of E per token while pooling: residues, centred residues, a result."""


@dataclass(frozen=True, slots=True)
class AutoSize:
    """How "auto" sized a model's budget: what was free, what a token costs."""

    tokens: int
    free_bytes: int
    bytes_per_token: int
    capped: bool  # MAX_AUTO_TOKENS was lower than what memory allowed

    def meta(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "free_bytes": self.free_bytes,
                "bytes_per_token": self.bytes_per_token, "capped": self.capped,
                "max_tokens": MAX_AUTO_TOKENS}


@dataclass(slots=True)
class _ModelBudget:
    """What one loaded model's runs learned: its auto size, the launch limit."""

    requested: int = AUTO_TOKENS
    resolved: int | None = None  # what "auto" last became (sized options come back here)
    auto: AutoSize | None = None
    limit: int | None = None
    overflows: int = 0


_BUDGETS: weakref.WeakKeyDictionary[nn.Module, _ModelBudget] = weakref.WeakKeyDictionary()
"""Per loaded network (`LoadedModel.module`), gone with it."""


def _state(model: LoadedModel) -> _ModelBudget:
    return _BUDGETS.setdefault(model.module, _ModelBudget())


def sized(options: EmbedOptions, model: LoadedModel) -> EmbedOptions:
    """`options` ready to plan with on `model`: truncation filled in (`for_model`) and an
    "auto" budget replaced by the device's (module docstring); a number stays as it is."""
    options = options.for_model(model.max_residues)
    state = _state(model)
    if options.toks_per_batch != AUTO_TOKENS:
        if options.toks_per_batch != state.resolved:  # not options sized here before
            state.requested = options.toks_per_batch
        return options
    state.requested = AUTO_TOKENS
    if model.device.type != "cuda":
        state.resolved = CPU_TOKENS
    else:
        if state.auto is None:
            per_token = bytes_per_token(model, options)
            state.auto = auto_size(free_bytes(model.device), per_token,
                                   longest=_longest(model, options))
        state.resolved = state.auto.tokens
    return replace(options, toks_per_batch=state.resolved)


def as_requested(options: EmbedOptions, model: LoadedModel) -> EmbedOptions:
    """`options` as the user asked them: "auto" back where `sized` filled in `model`'s
    device's budget. For a model on another device, which sizes its own: a Ray actor on
    a GPU must not inherit the 4,096 tokens a GPU-less driver's "auto" became. (Per
    model, as `sized` keeps it: a number equal to what "auto" already became on this
    model in this process counts as "auto".)"""
    state = _state(model)
    if state.requested == AUTO_TOKENS and options.toks_per_batch == state.resolved:
        return replace(options, toks_per_batch=AUTO_TOKENS)
    return options


def auto_size(free: int, per_token: int, *, longest: int) -> AutoSize:
    """The budget `free` bytes hold at `per_token` bytes a token: capped, and at least
    the `longest` sequence's tokens (a device that cannot hold one fails it by name)."""
    fits = max(0, int(free * FREE_FRACTION) - RESERVE_BYTES) // per_token
    tokens = max(longest, min(fits, MAX_AUTO_TOKENS))
    return AutoSize(tokens=tokens, free_bytes=free, bytes_per_token=per_token,
                    capped=fits > MAX_AUTO_TOKENS)


def free_bytes(device: torch.device) -> int:
    """Free device memory: the driver's figure plus the allocator's unused cache."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def bytes_per_token(model: LoadedModel, options: EmbedOptions) -> int:
    """Device bytes one token costs at the peak of a batch (module docstring)."""
    width = model.embed_dim
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    layers = len(options.layer_indices(name=model.name, num_layers=model.num_layers))
    cost = itemsize * width * (ACTIVATION_WIDTHS + layers) + 4 * width * POOLING_WIDTHS
    if model.fast is None:  # padded engines build (B, H, T, T) fp32 scores and probabilities
        heads = int(getattr(model.module, "attention_heads", max(1, width // 64)))
        cost += 2 * 4 * heads * _longest(model, options)
    return cost


def _longest(model: LoadedModel, options: EmbedOptions) -> int:
    """Tokens of the longest sequence or window a batch can hold."""
    return min(options.cut, model.max_residues) + SPECIAL_TOKENS


def launch_limit(model: LoadedModel) -> int | None:
    """The most tokens a launch may have on `model` after an overflow; None: no limit."""
    return _state(model).limit


def overflowed(model: LoadedModel, tokens: int) -> None:
    """A launch of `tokens` tokens (several sequences) ran out of memory on `model`."""
    state = _state(model)
    half = max(1, tokens // 2)
    state.limit = half if state.limit is None else min(state.limit, half)
    state.overflows += 1


def budget_meta(model: LoadedModel, options: EmbedOptions,
                actors: dict[str, int] | None = None) -> dict[str, Any]:
    """meta["budget"]: the tokens planned per batch, whether "auto" chose them (and from
    what), and the launch limit an overflow left (None: none happened). With `actors`
    (Ray: actor tag -> the budget it planned with), theirs: the rows came from them, and
    the driver's own sizing (often a GPU-less machine's 4,096) planned none."""
    state = _state(model)
    auto = state.requested == AUTO_TOKENS
    out = {"toks_per_batch": options.toks_per_batch,
           "requested": "auto" if auto else state.requested,
           "auto": state.auto.meta() if auto and state.auto is not None else None,
           "launch_limit": state.limit, "overflows": state.overflows}
    if actors:
        out.update(toks_per_batch=max(actors.values()), auto=None, launch_limit=None,
                   overflows=None, sized_on="each Ray actor's device",
                   actors=dict(sorted(actors.items())))
    return out
