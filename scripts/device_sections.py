"""The device check's sections; scripts/device_check.py runs each in its own process.

Every contender is built, warmed up, measured and freed before the next is built, so its
memory figures are its own and the card is empty for the next one. Models have random
weights from one seed, built on the device (nothing is downloaded): every contender of a
section computes the same function. fair-esm, the package and transformers are imported
inside the contender or section that needs them: a missing one is a skipped entry.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from device_measure import (
    Memory,
    Positions,
    attention_profile,
    first_layer,
    gemm_rate,
    machine_facts,
    release,
    synchronize,
)
from device_runner import Context, Result, missing_line
from torch import nn

if TYPE_CHECKING:
    from esm.model.esm2 import ESM2

    from esm2_batch.models import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
TRUNCATION = 1022
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DTYPE_NAMES = {FP16: "fp16", BF16: "bf16", FP32: "fp32"}
QUICK_SHAPES = {  # tiny stand-ins for the published sizes in --quick (head dims 16, 24)
    "650M": ("tiny-a", "esm2_t2_tiny_a", 2, 64, 4),
    "3B": ("tiny-b", "esm2_t3_tiny_b", 3, 96, 4),
}
SEQUENCES = {  # (parity, speed) proteins per size; sized so the run fits 8 min on an H100
    "650M": (200, 1000), "3B": (100, 400), "quick": (6, 12)}
TOKS_PER_BATCH = 16384

Run = Callable[[list[str]], torch.Tensor]
Build = Callable[[], tuple[Run, nn.Module]]


class Unavailable(Exception):
    """A feature this build of the package does not have (yet): the contender is
    recorded as not available, not as an error."""


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


def spec_of(ctx: Context, size: str) -> ModelSpec:
    from esm2_batch.models import ESM2_MODELS, ModelSpec

    return ModelSpec(*QUICK_SHAPES[size]) if ctx.quick else ESM2_MODELS[size]


def random_module(spec: ModelSpec, device: torch.device, seed: int) -> ESM2:
    """fair-esm's ESM2 of `spec`'s shape, PyTorch's default init under `seed`, built in
    fp32 on `device`: the same weights every time it is called with the same seed."""
    from esm.model.esm2 import ESM2

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            module = ESM2(num_layers=spec.num_layers, embed_dim=spec.embed_dim,
                          attention_heads=spec.attention_heads, alphabet="ESM-1b",
                          token_dropout=True)
    return module.eval().requires_grad_(False)


def proteins(n: int, seed: int, *, longest: int | None = None) -> list[str]:
    """bench_embed's human-like length mix (median ~400, 2% beyond 3,000 residues), cut
    to `longest` residues if given (--quick: half precision is slow on CPU)."""
    import bench_embed as bench

    rng = random.Random(seed)
    lengths = bench.protein_lengths(n, rng)
    return bench.random_proteins([min(k, longest or k) for k in lengths], rng)


def half(ctx: Context) -> torch.dtype:
    return FP16 if ctx.cuda else FP32  # CPU: fp32 is the fast precision there


def gemm_peak(ctx: Context, dtype: torch.dtype) -> float | None:
    """The gemm section's median TFLOP/s in `dtype` (the MFU denominator), if measured."""
    entry = ctx.report.get("gemm", {}).get(DTYPE_NAMES[dtype], {})
    value = entry.get("median_tflop_per_s") if isinstance(entry, dict) else None
    return float(value) if value else None


def compare(rows: torch.Tensor, want: torch.Tensor) -> Result:
    cosine = torch.nn.functional.cosine_similarity(rows.float(), want, dim=-1)
    return {"max_abs_diff": float((rows.float() - want).abs().max()),
            "min_cosine": round(float(cosine.min()), 6),
            "finite": bool(torch.isfinite(rows).all())}


def auto_budget() -> bool:
    """Whether this build sizes the token budget itself (toks_per_batch "auto")."""
    from esm2_batch.embedding.options import EmbedOptions
    from esm2_batch.errors import InputError

    try:
        EmbedOptions(toks_per_batch="auto").check_values()  # type: ignore[arg-type]
    except (InputError, TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------
# Contenders: each build() returns (run, network) and holds the only reference
# --------------------------------------------------------------------------------------


def build_ours(ctx: Context, spec: ModelSpec, engine: str, dtype: torch.dtype,
               toks: int | str) -> tuple[Run, nn.Module]:
    """embed_sequences with one of this build's engines."""
    from esm2_batch.embedding.embed import embed_sequences
    from esm2_batch.models import esm2_from_module

    if toks == "auto" and not auto_budget():
        raise Unavailable("toks_per_batch 'auto'")
    module = random_module(spec, ctx.device, ctx.args.seed)
    model = esm2_from_module(module, module.alphabet, name=spec.name, device=ctx.device,
                             dtype=dtype, engine=engine)  # type: ignore[arg-type]

    def run(sequences: list[str]) -> torch.Tensor:
        rows = embed_sequences(model, sequences, toks_per_batch=toks,  # type: ignore[arg-type]
                               truncation=TRUNCATION)
        assert isinstance(rows, torch.Tensor)
        return rows

    return run, (model.fast if model.fast is not None else model.module)


def build_fair(ctx: Context, spec: ModelSpec, dtype: torch.dtype,
               toks: int) -> tuple[Run, nn.Module]:
    """fair-esm's own esm-extract loop (its batching, forward and pooling)."""
    import bench_embed as bench

    module = random_module(spec, ctx.device, ctx.args.seed).to(dtype)
    alphabet = module.alphabet

    def run(sequences: list[str]) -> torch.Tensor:
        return bench.fair_esm_extract(module, alphabet, sequences, toks_per_batch=toks,
                                      truncation=TRUNCATION, device=ctx.device)[0]

    return run, module


def build_transformers(ctx: Context, spec: ModelSpec, dtype: torch.dtype,
                       toks: int) -> tuple[Run, nn.Module]:
    """transformers' EsmModel with attn_implementation="sdpa" on the same weights, fed
    the embedder's token-budget batches (bench_embed.transformers_extract)."""
    import bench_embed as bench

    module = random_module(spec, ctx.device, ctx.args.seed)
    model = bench.transformers_model(module, ctx.device, dtype)
    if model is None:
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
    alphabet = module.alphabet
    del module

    def run(sequences: list[str]) -> torch.Tensor:
        return bench.transformers_extract(model, alphabet, sequences, toks_per_batch=toks,
                                          truncation=TRUNCATION, device=ctx.device)[0]

    return run, model


def contender(ctx: Context, build: Build, sequences: list[str], *, timed: bool
              ) -> tuple[Result, torch.Tensor | None]:
    """Build, (profile and warm up, when `timed`), run once, free: the entry and rows.

    A missing package or feature gives {"skipped": why} and no rows."""
    memory = Memory(ctx.device)
    memory.begin()
    try:
        run, network = build()
    except ModuleNotFoundError as exc:
        return {"skipped": missing_line(exc)}, None
    except Unavailable as exc:
        return {"skipped": f"not available in this build: {exc}"}, None
    memory.built()
    counter = Positions(first_layer(network))
    entry: Result = {}
    try:
        if timed:
            warm = sequences[: 4 if ctx.quick else 8]
            entry.update(attention_profile(lambda: run(warm), ctx.device))
            run(warm)  # once more without the profiler: kernels, allocator, autotuning
        counter.reset()
        memory.running()
        began = _clock(ctx.device)
        rows = run(sequences)
        entry["seconds"] = round(_clock(ctx.device) - began, 3)
        memory.end()
    finally:
        counter.remove()
    entry["positions_computed"] = counter.total if counter.hooked else None
    entry.update(memory.figures())
    return entry, rows


def _clock(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def machine(ctx: Context) -> Result:
    """What the figures were measured on; `cuda_works` tells the parent whether this
    process could use the GPU (a forked one that cannot makes it spawn the rest)."""
    return machine_facts(ctx.device)


def gemm(ctx: Context) -> Result:
    """The MFU denominator: a dense n^3 product per dtype (8192 on a GPU)."""
    n, reps = (256, 3) if ctx.quick else (8192, 10)
    result: Result = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    for dtype, name in DTYPE_NAMES.items():
        result[name] = gemm_rate(n, dtype, ctx.device, reps=reps)
        ctx.partial(result)
        release(ctx.device)
    return result


def speed_contenders(ctx: Context, spec: ModelSpec, toks: int
                     ) -> list[tuple[str, torch.dtype, Build]]:
    """This build's engines first (the figures the lease is for), then the others."""
    from esm2_batch.models import ENGINES

    dtype = half(ctx)
    out: list[tuple[str, torch.dtype, Build]] = [
        (engine, dtype, partial(build_ours, ctx, spec, engine, dtype, toks))
        for engine in ENGINES if engine != "reference"]
    out.append(("fast_auto", dtype, partial(build_ours, ctx, spec, "fast", dtype, "auto")))
    out.append(("transformers_sdpa", dtype, partial(build_transformers, ctx, spec, dtype, toks)))
    out.append((f"fairesm_{DTYPE_NAMES[dtype]}", dtype,
                partial(build_fair, ctx, spec, dtype, toks)))
    if ctx.cuda and spec.size == "650M":  # issue 16's goal is read against fair-esm fp32
        out.append(("fairesm_fp32", FP32, partial(build_fair, ctx, spec, FP32, toks)))
    return out


def speed_at(ctx: Context, size: str) -> Result:
    """Tokens/s, computed padding, MFU, memory and attention backend per contender."""
    import bench_embed as bench

    from esm2_batch.embedding.batching import SPECIAL_TOKENS

    spec = spec_of(ctx, size)
    n = SEQUENCES["quick" if ctx.quick else size][1]
    sequences = proteins(n, ctx.args.seed + 2, longest=300 if ctx.quick else None)
    kept = [min(len(s), TRUNCATION) for s in sequences]
    real = sum(k + SPECIAL_TOKENS for k in kept)
    flops = sum(bench.sequence_flops(k + SPECIAL_TOKENS, spec) for k in kept)
    toks = 8192 if ctx.quick else TOKS_PER_BATCH
    result: Result = {"arch": spec.name, "n_seqs": n, "real_tokens": real,
                      "mean_tokens_per_seq": round(real / n, 1), "toks_per_batch": toks,
                      "useful_gflop": round(flops / 1e9, 1),
                      "mfu_denominator": "gemm median TFLOP/s of the contender's dtype"}
    ctx.partial(result)
    for label, dtype, build in speed_contenders(ctx, spec, toks):
        entry, rows = contender(ctx, build, sequences, timed=True)
        del rows
        if "seconds" in entry:
            seconds, computed = entry["seconds"], entry["positions_computed"]
            peak = gemm_peak(ctx, dtype)
            entry.update({
                "dtype": DTYPE_NAMES[dtype], "tokens_per_s": round(real / seconds, 1),
                "padding_fraction": round(1 - real / computed, 4) if computed else None,
                "tflop_per_s": round(flops / seconds / 1e12, 3),
                "mfu": round(flops / seconds / (peak * 1e12), 3) if peak else None})
        result[label] = entry
        ctx.partial(result)
        release(ctx.device)
    rates = {k: v["tokens_per_s"] for k, v in result.items()
             if isinstance(v, dict) and "tokens_per_s" in v}
    if "fast" in rates:
        result["speedup_of_fast"] = {k: round(rates["fast"] / v, 3)
                                     for k, v in rates.items() if k != "fast"}
    return result


def parity_at(ctx: Context, size: str) -> Result:
    """Every engine in fp16 and bf16 against fair-esm's fp32 loop, with a derived limit."""
    import bench_embed as bench

    from esm2_batch.models import ENGINES
    from tests.tolerance import low_precision_tolerance

    spec = spec_of(ctx, size)
    n = SEQUENCES["quick" if ctx.quick else size][0]
    sequences = proteins(n, ctx.args.seed + 1, longest=200 if ctx.quick else None)
    toks = 8192 if ctx.quick else TOKS_PER_BATCH
    module = random_module(spec, ctx.device, ctx.args.seed)
    want, _ = bench.fair_esm_extract(module, module.alphabet, sequences, toks_per_batch=toks,
                                     truncation=TRUNCATION, device=ctx.device)
    del module
    release(ctx.device)
    magnitude = float(want.abs().max())
    result: Result = {
        "arch": spec.name, "n_seqs": n, "reference": "fairesm_fp32", "magnitude": magnitude,
        "limit": "tests/tolerance.py low_precision_tolerance(dtype, depth=layers, "
                 "magnitude=max |reference row|) = 8 x eps(dtype) x sqrt(layers) x magnitude"}
    ctx.partial(result)
    cases = [(f"{engine}_{DTYPE_NAMES[d]}", d, partial(build_ours, ctx, spec, engine, d, toks))
             for engine in ENGINES for d in (FP16, BF16)]
    judged = [label for label, _, _ in cases]
    cases.append(("fairesm_fp16", FP16, partial(build_fair, ctx, spec, FP16, toks)))
    for label, dtype, build in cases:
        entry, rows = contender(ctx, build, sequences, timed=False)
        if rows is not None:
            limit = low_precision_tolerance(dtype, depth=spec.num_layers, magnitude=magnitude)
            entry.update(compare(rows, want))
            entry.update({"limit": limit,
                          "pass": entry["finite"] and entry["max_abs_diff"] <= limit})
            if label not in judged:
                entry["yardstick"] = "fair-esm's own fp16 loop: not part of the verdict"
        result[label] = entry
        ctx.partial(result)
        release(ctx.device)
    verdicts = [result[k]["pass"] for k in judged if "pass" in result[k]]
    result["pass"] = all(verdicts) if verdicts else None
    return result


def oom(ctx: Context) -> Result:
    """A budget that cannot fit under a memory cap: the batch is halved, rows still
    within the limit of the unconstrained run."""
    if not ctx.cuda:
        return {"skipped": "needs CUDA (set_per_process_memory_fraction); the halving logic "
                           "is tested on CPU with an injected OOM (tests/embedding/test_oom.py)"}
    from esm2_batch.embedding.batching import plan_batches
    from esm2_batch.embedding.embed import embed_sequences
    from esm2_batch.models import esm2_from_module
    from tests.tolerance import low_precision_tolerance

    spec = spec_of(ctx, "650M")
    module = random_module(spec, ctx.device, ctx.args.seed)
    model = esm2_from_module(module, module.alphabet, name=spec.name, device=ctx.device,
                             dtype=FP16)
    sequences = [s[:TRUNCATION] for s in proteins(160, ctx.args.seed + 3)]
    toks = 131_072
    want = embed_sequences(model, sequences, toks_per_batch=toks)
    assert isinstance(want, torch.Tensor)
    counter = Positions(first_layer(model.fast if model.fast is not None else model.module))
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    release(ctx.device)
    allowed = torch.cuda.memory_allocated(ctx.device) + int(1.5 * 2**30)
    torch.cuda.set_per_process_memory_fraction(allowed / total, ctx.device)
    try:
        got = embed_sequences(model, sequences, toks_per_batch=toks)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        counter.remove()
    assert isinstance(got, torch.Tensor)
    planned = len(plan_batches([len(s) for s in sequences], toks_per_batch=toks).batches)
    limit = 2 * low_precision_tolerance(FP16, depth=spec.num_layers,
                                        magnitude=float(want.abs().max()))
    result: Result = {"arch": spec.name, "n_seqs": len(sequences), "toks_per_batch": toks,
                      "memory_fraction": round(allowed / total, 4),
                      "batches_planned": planned, "forward_calls": len(counter.calls),
                      "halved": len(counter.calls) > planned,
                      "largest_forward_positions": max(counter.calls, default=None),
                      "smallest_forward_positions": min(counter.calls, default=None),
                      **compare(got, want), "limit": limit}
    result["pass"] = result["finite"] and result["max_abs_diff"] <= limit
    return result


def end_to_end(ctx: Context) -> Result:
    """data/'s 2,000 genes through the fake Ensembl into esm_all.pt, row cache off."""
    import bench_pipeline

    from esm2_batch import read_gene_list
    from esm2_batch.models import esm2_from_module

    queries = list(read_gene_list(ROOT / "data" / "hvg_pbmc3k_seurat_v3_top2000.txt").genes)
    queries = queries[:20] if ctx.quick else queries
    spec = spec_of(ctx, "650M")
    module = random_module(spec, ctx.device, ctx.args.seed)
    model = esm2_from_module(module, module.alphabet, name=spec.name, device=ctx.device,
                             dtype=half(ctx))
    options = argparse.Namespace(coding=3, latency=0.2, server_rate=15.0, rate_limit=15.0,
                                 toks_per_batch=8192 if ctx.quick else 32768)
    with tempfile.TemporaryDirectory(prefix="device-check-e2e-") as work:
        result, _ = bench_pipeline.measure(queries, model, options, Path(work))
    result.pop("machine", None)
    result.update({"row_cache": "off", "coding_isoforms_per_gene": options.coding,
                   "toks_per_batch": options.toks_per_batch})
    return result


def ray(ctx: Context) -> Result:
    """`--ray local` on this machine's device gives the single-process rows."""
    try:
        import ray as _ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray is not installed"}
    from esm2_batch.embedding.embed import embed_sequences
    from esm2_batch.embedding.options import EmbedOptions
    from esm2_batch.models import load_model
    from esm2_batch.run.ray_stage import RayOptions, embed_on_ray, shutdown
    from tests.fakes.tiny_esm import write_random_checkpoint, write_tiny_checkpoint

    sequences = [s[:TRUNCATION] for s in proteins(16 if ctx.quick else 200, ctx.args.seed + 4)]
    options = EmbedOptions(toks_per_batch=8192)
    rows: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="device-check-ray-") as work:
        path = (write_tiny_checkpoint(Path(work), num_layers=2, embed_dim=32) if ctx.quick
                else write_random_checkpoint(Path(work), size="35M"))
        single = embed_sequences(load_model(path, device=ctx.device), sequences,
                                 toks_per_batch=options.toks_per_batch)
        items = [(str(i), f"s{i}", s) for i, s in enumerate(sequences)]

        def keep(keys: list[str], batch: Any) -> None:
            for key, row in zip(keys, batch, strict=True):
                rows[key] = torch.as_tensor(row).float()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats = embed_on_ray(
                items, model=str(path), embed=options, on_rows=keep,
                on_failure=lambda key, name, error: None,
                options=RayOptions(address="local", actors=1, device=str(ctx.device),
                                   rows_per_task=16, local_cpus=2 if ctx.quick else None))
            shutdown()
    assert isinstance(single, torch.Tensor)
    got = torch.stack([rows[str(i)] for i in range(len(sequences))])
    return {"arch": path.stem, "n_seqs": len(sequences), "wall_s": round(stats.wall_s, 1),
            **compare(got, single)}
