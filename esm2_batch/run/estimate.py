"""How long embedding will take, before paying for it (--dry_run, and every run's summary).

A user about to embed 2,000 genes at 3B, or a proteome at 650M on a laptop, should know
whether it is ten minutes or two days before it starts. The cost model, per token of a
sequence of T tokens (T capped at the context: a --long_seqs window attends one window):

    FLOPs/token = layers x (24 x dim^2  +  4 x T x dim)
                  linears: 2 x 12 dim^2 params per layer; attention scores and their use

divided by a throughput in FLOP/s:

- on a GPU type in GPU_FLOPS, that stored figure (named in the output as stored);
- otherwise measured here, now, in a second or two: a random ESM2 of the model's width
  (one layer: the per-layer cost is what matters, and width decides how well the
  matrices use the machine) runs a few forwards of the plan's typical length on the
  run's device, dtype and engine, in a worker thread as the embedding stage runs them;
  the median rate is the throughput.

No weights are read: the architecture comes from the size's registry entry
(models.ESM2_MODELS) or a fair-esm checkpoint's cfg (memory-mapped, no tensor is read);
other models (HF folders, ESM C, ESM3) get no estimate and the plan says so.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from esm2_batch.run.config import ModelOptions

__all__ = ["GPU_FLOPS", "Architecture", "Estimate", "architecture_of", "estimate",
           "flops_per_token", "format_duration"]

GPU_FLOPS: dict[str, float] = {"H200": 3.0e14, "H100": 2.6e14, "A100": 1.1e14,
                               "L40S": 1.2e14, "A10": 4.0e13, "V100": 5.0e13, "T4": 2.0e13}
"""Sustained ESM2 forward FLOP/s in fp16/bf16 by GPU type (a substring of the device
name): about a third of the dense tensor-core peak, what a packed transformer forward of
4,096-token batches reaches; rough by nature, so the output says it is stored."""

CALIBRATION_S = 0.5
"""About how long the CPU measurement runs, after one warm-up forward (at least three
forwards: about 1 s idle, 2-3 s on a loaded machine)."""


@dataclass(frozen=True)
class Architecture:
    """What the cost depends on: depth and width (heads and context for the random model
    and the truncation default)."""

    name: str
    num_layers: int
    embed_dim: int
    heads: int
    max_residues: int = 1022


def architecture_of(options: ModelOptions) -> Architecture | None:
    """The architecture `options.model` names, without reading its weights; None for what
    this cost model does not cover (HF folders, ESM C, ESM3) or cannot read."""
    from esm2_batch.models import ESM2_MODELS

    text = options.model
    for spec in ESM2_MODELS.values():
        if text.upper() == spec.size.upper() or text == spec.name:
            return Architecture(spec.name, spec.num_layers, spec.embed_dim,
                                spec.attention_heads)
    path = Path(text).expanduser()
    if options.backend in ("auto", "fair-esm") and path.is_file():
        return _checkpoint_architecture(path)
    return None


def _checkpoint_architecture(path: Path) -> Architecture | None:
    """cfg['model'] of a fair-esm checkpoint, memory-mapped: no tensor is read."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        cfg = data["cfg"]["model"]
        return Architecture(path.stem, int(cfg.encoder_layers), int(cfg.encoder_embed_dim),
                            int(cfg.encoder_attention_heads))
    except Exception:  # not a readable fair-esm checkpoint: the real run says why
        return None


def flops_per_token(arch: Architecture, length: int) -> float:
    """Forward FLOPs of one token of a `length`-token sequence (module docstring)."""
    dim = arch.embed_dim
    return arch.num_layers * (24.0 * dim * dim + 4.0 * length * dim)


def work_flops(arch: Architecture, token_counts: Iterable[int], span: int) -> float:
    """FLOPs of embedding sequences of these token counts; attention spans `span` tokens
    at most (the context, for --long_seqs window)."""
    return sum(t * flops_per_token(arch, min(t, span)) for t in token_counts)


@dataclass(frozen=True)
class Estimate:
    """An embedding time and how it was derived."""

    seconds: float
    flops: float
    flops_per_s: float
    source: str  # "measured on this cpu: ..." or "stored figure for NVIDIA H100 ..."

    def describe(self) -> str:
        return (f"{format_duration(self.seconds)} ({self.flops:.3g} FLOPs at "
                f"{self.flops_per_s:.3g} FLOP/s, {self.source})")

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "flops": self.flops,
                "flops_per_s": self.flops_per_s, "throughput_source": self.source}


def estimate(arch: Architecture, token_counts: Sequence[int], *, span: int,
             device: str | None, dtype: str | None, engine: str) -> Estimate:
    """The time to embed sequences of `token_counts` tokens with `arch` on `device`
    (None: cuda when available, as the loader chooses)."""
    from esm2_batch.models import resolve_dtype

    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_dtype(dtype, target)
    flops = work_flops(arch, token_counts, span)
    stored = _stored_figure(target)
    if stored is not None:
        rate, source = stored
    else:
        typical = typical_length(token_counts, span)
        layers = 1
        rate = _measured_rate(arch.embed_dim, arch.heads, layers, typical, str(target),
                              str(precision), engine)
        source = (f"measured on this {target.type}: a random {layers}-layer ESM2 of width "
                  f"{arch.embed_dim}, {typical}-token sequences, "
                  f"{str(precision).removeprefix('torch.')}, {engine} engine, "
                  f"{torch.get_num_threads()} threads")
    return Estimate(flops / rate if rate > 0 else math.inf, flops, rate, source)


def _stored_figure(device: torch.device) -> tuple[float, str] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for gpu, rate in GPU_FLOPS.items():
        if gpu in name:
            return rate, f"stored figure for {name} (GPU_FLOPS['{gpu}'], not measured)"
    return None


def typical_length(token_counts: Sequence[int], span: int) -> int:
    """The token-weighted mean length (what most of the FLOPs see), within the context."""
    total = sum(token_counts)
    if not total:
        return min(400, span)
    weighted = sum(t * t for t in token_counts) / total
    return max(8, min(int(weighted), span))


@cache
def _measured_rate(dim: int, heads: int, layers: int, length: int, device: str,
                   dtype: str, engine: str) -> float:
    """Median FLOP/s of a random ESM2 of this width on batches of about 2,048 tokens of
    `length`, timed for about CALIBRATION_S after one warm-up (once per process and
    shape). Measured in a worker thread, as run/stages.py embeds: on a loaded CPU the
    main thread's OpenMP team runs the same forward several times slower (measured 4x on
    a shared 2-core machine), which would make every CPU estimate that much too long."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibration") as pool:
        return pool.submit(_time_forwards, dim, heads, layers, length, device, dtype,
                           engine).result()


def _time_forwards(dim: int, heads: int, layers: int, length: int, device: str,
                   dtype: str, engine: str) -> float:
    from esm.model.esm2 import ESM2

    from esm2_batch.models import esm2_from_module, representations

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads,
                      alphabet="ESM-1b", token_dropout=True)
        rows = max(1, round(2048 / length))
        tokens = torch.randint(4, 24, (rows, length))
    model = esm2_from_module(module, module.alphabet, name="calibration", device=device,
                             dtype=dtype.removeprefix("torch."),
                             engine="fast" if engine == "fast" else "reference")
    tokens[:, 0], tokens[:, -1] = 0, 2  # BOS, EOS
    tokens = tokens.to(model.device)
    per_batch = rows * length * flops_per_token(Architecture("", layers, dim, heads), length)
    times: list[float] = []
    with torch.inference_mode():
        representations(model, tokens, layer=layers)  # warm-up: allocations, kernels
        _sync(model.device)
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < CALIBRATION_S
                                 and len(times) < 50):
            began = time.perf_counter()
            representations(model, tokens, layer=layers)  # as embedding/embed.py runs it
            _sync(model.device)
            times.append(time.perf_counter() - began)
    return per_batch / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
