"""One command that proves the GPU path: parity, speed, OOM halving, end to end, Ray.

On one CUDA GPU it finishes within about 8 minutes (random weights at the published
architectures, built in memory on the GPU: nothing is downloaded) and prints one JSON
object, also written to --out after every section (a run cut short keeps what it
measured). Every figure is measured in this run:

- parity: fair-esm fp32 rows (its own esm-extract loop) against the fast engine in fp16
  and bf16 and the reference engine in fp16, on the same weights (650M architecture,
  a few hundred real-length sequences): max abs diff and min cosine per contender;
- speed at 650M and 3B: tokens/s of fair-esm's esm-extract loop in fp16 (and fp32 at
  650M), transformers' EsmModel with sdpa in fp16 when importable, embed_sequences (fast
  engine, fp16); padding fraction; achieved matmul FLOP/s against a dense fp16/bf16 matmul
  peak measured in the same run (MFU); peak GPU memory per contender;
- oom: under torch.cuda.set_per_process_memory_fraction a batch that does not fit is
  halved, and every row still equals the unconstrained run (within fp16 rounding);
- end_to_end: data/'s 2,000-gene HVG list through the fake Ensembl server (200 ms
  latency, 15 requests/s) into esm_all.pt at 650M (scripts/bench_pipeline.py): wall per
  stage and the overlap ratio;
- ray: `--ray local` on this machine's device gives the single-process rows.

The goals the figures are read against (issue 16) are in "goals". With --quick it runs on
CPU with tiny architectures in seconds: every section runs except those that need CUDA,
which say so ({"skipped": reason}).

    python scripts/device_check.py --out device_check.json           # on a CUDA machine
    python scripts/device_check.py --quick --out /tmp/quick.json     # CI, CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path[:0] = [str(ROOT), str(SCRIPTS)]

import bench_embed as bench  # noqa: E402
import bench_pipeline  # noqa: E402
from esm.model.esm2 import ESM2  # noqa: E402

from esm2_batch import read_gene_list  # noqa: E402
from esm2_batch.embedding import embed as embed_module  # noqa: E402
from esm2_batch.embedding.batching import SPECIAL_TOKENS, padded_tokens, plan_batches  # noqa: E402
from esm2_batch.embedding.embed import embed_sequences  # noqa: E402
from esm2_batch.embedding.options import EmbedOptions  # noqa: E402
from esm2_batch.models import ESM2_MODELS, LoadedModel, ModelSpec, esm2_from_module  # noqa: E402

Section = dict[str, Any]
QUICK_SPECS = {  # tiny stand-ins for the published sizes in --quick (head dims 16 and 24)
    "650M": ModelSpec("tiny-a", "esm2_t2_tiny_a", 2, 64, 4),
    "3B": ModelSpec("tiny-b", "esm2_t3_tiny_b", 3, 96, 4),
}
GOALS = {
    "speedup_fast_fp16_vs_fairesm_fp32_650M": 5.0,
    "speedup_fast_vs_transformers_fp16_650M": 1.3,
    "mfu_fast_650M": 0.40,
    "end_to_end_2000_genes_650M_s": 60.0,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU, tiny architectures, seconds: keeps the script from rotting")
    p.add_argument("--out", type=Path, default=Path("device_check.json"))
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    p.add_argument("--skip", action="append", default=[],
                   choices=["parity", "speed", "oom", "end_to_end", "ray"])
    p.add_argument("--budget_s", type=float, default=450.0,
                   help="sections not started by then are skipped (the run must fit 8 min)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Check:
    """The run's state: options, the JSON being filled in, and the clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
        self.cuda = self.device.type == "cuda"
        self.half = torch.float16 if self.cuda else torch.float32  # CPU: fp32 is fast there
        self.start = time.perf_counter()
        self.report: dict[str, Any] = {"quick": self.quick, "device": str(self.device)}

    def spec(self, size: str) -> ModelSpec:
        return QUICK_SPECS[size] if self.quick else ESM2_MODELS[size]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.report["wall_s"] = round(self.elapsed(), 1)
        self.args.out.write_text(json.dumps(self.report, indent=1) + "\n")

    def section(self, name: str, body: Callable[[Check], Section]) -> None:
        """Run one section; its failure is recorded, not fatal: a GPU lent for minutes
        must yield every other figure."""
        if name in self.args.skip:
            result: Section = {"skipped": "--skip"}
        elif self.elapsed() > self.args.budget_s:
            result = {"skipped": f"time budget of {self.args.budget_s:.0f} s spent"}
        else:
            began = time.perf_counter()
            try:
                result = body(self)
            except Exception as exc:  # recorded in the JSON, run goes on
                result = {"error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(limit=6)}
            result["section_s"] = round(time.perf_counter() - began, 1)
            release(self.device)
        self.report[name] = result
        self.save()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_module(spec: ModelSpec, device: torch.device, seed: int) -> ESM2:
    """An ESM2 of `spec`'s shape with PyTorch's default init under `seed`, built on
    `device` (a 3B initialises in seconds on a GPU, minutes on CPU)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            module = ESM2(num_layers=spec.num_layers, embed_dim=spec.embed_dim,
                          attention_heads=spec.attention_heads, alphabet="ESM-1b",
                          token_dropout=True)
    return module.eval().requires_grad_(False)


def ours(module: ESM2, spec: ModelSpec, dtype: torch.dtype, engine: str = "fast"
         ) -> LoadedModel:
    """The package's encoder on a copy of `module` (preparing it casts in place)."""
    return esm2_from_module(copy.deepcopy(module), module.alphabet, name=spec.name,
                            device=module.embed_tokens.weight.device, dtype=dtype,
                            engine=engine)  # type: ignore[arg-type]


def proteins(n: int, seed: int, *, longest: int | None = None) -> list[str]:
    """bench_embed's human-like length mix (median ~400, 2% beyond 3,000 residues), cut
    to `longest` residues if given (--quick: half precision is slow on CPU)."""
    rng = random.Random(seed)
    lengths = bench.protein_lengths(n, rng)
    return bench.random_proteins([min(k, longest or k) for k in lengths], rng)


@contextmanager
def peak_memory(device: torch.device, into: Section, key: str) -> Iterator[None]:
    """Record the peak GPU memory allocated inside the block, in GiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        into[key] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def compare(rows: torch.Tensor, want: torch.Tensor) -> Section:
    cosine = torch.nn.functional.cosine_similarity(rows.float(), want, dim=-1)
    return {"max_abs_diff": float((rows.float() - want).abs().max()),
            "min_cosine": round(float(cosine.min()), 6),
            "finite": bool(torch.isfinite(rows).all())}


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def parity(check: Check) -> Section:
    spec = check.spec("650M")
    n = 8 if check.quick else 300
    sequences = proteins(n, check.args.seed + 1, longest=200 if check.quick else None)
    module = random_module(spec, check.device, check.args.seed)
    common = {"toks_per_batch": 8192 if check.quick else 16384, "truncation": 1022}
    want, _ = bench.fair_esm_extract(module, module.alphabet, sequences, device=check.device,
                                     **common)
    result: Section = {"arch": spec.name, "n_seqs": n, "reference": "fairesm_fp32",
                       "max_abs_fairesm_fp32": float(want.abs().max())}
    for label, dtype, engine in (("fast_fp16", torch.float16, "fast"),
                                 ("fast_bf16", torch.bfloat16, "fast"),
                                 ("reference_fp16", torch.float16, "reference")):
        model = ours(module, spec, dtype, engine)
        rows = embed_sequences(model, sequences, **common)
        assert isinstance(rows, torch.Tensor)
        result[label] = compare(rows, want)
        del model
        release(check.device)
    return result


def speed_at(check: Check, size: str) -> Section:
    spec = check.spec(size)
    n = 16 if check.quick else (1000 if size == "650M" else 400)
    toks = 8192 if check.quick else 16384
    sequences = proteins(n, check.args.seed + 2, longest=400 if check.quick else None)
    kept = [min(len(s), 1022) for s in sequences]
    real = sum(k + SPECIAL_TOKENS for k in kept)
    flops = sum(bench.sequence_flops(k + SPECIAL_TOKENS, spec) for k in kept)
    peak = bench.matmul_peak(spec.embed_dim, check.device, check.half)
    module = random_module(spec, check.device, check.args.seed)
    result: Section = {"arch": spec.name, "n_seqs": n, "real_tokens": real,
                       "toks_per_batch": toks, "dtype": str(check.half).removeprefix("torch."),
                       "peak_matmul_tflop_per_s": round(peak / 1e12, 3)}
    plan = plan_batches(kept, toks_per_batch=toks)
    ours_padded = sum(padded_tokens([kept[i] for i in b]) for b in plan.batches)
    for label, run in contenders(check, spec, module, toks):
        run(sequences[:4])  # warm-up: kernels, allocator
        stats: Section = {}
        with peak_memory(check.device, stats, "peak_gpu_gib"):
            bench.synchronize(check.device)
            began = time.perf_counter()
            _, padded = run(sequences)
            bench.synchronize(check.device)
            seconds = time.perf_counter() - began
        stats.update({"seconds": round(seconds, 2), "tokens_per_s": round(real / seconds, 1),
                      "padding_fraction": round(1 - real / (padded or ours_padded), 4),
                      "tflop_per_s": round(flops / seconds / 1e12, 3),
                      "mfu": round(flops / seconds / peak, 3)})
        result[label] = stats
        release(check.device)
    peak = max(peak, bench.matmul_peak(spec.embed_dim, check.device, check.half))
    result["peak_matmul_tflop_per_s"] = round(peak / 1e12, 3)
    rate = {k: v["tokens_per_s"] for k, v in result.items() if isinstance(v, dict)}
    for other in ("fairesm_fp16", "fairesm_fp32", "transformers_sdpa"):
        if other in rate:
            result[f"speedup_fast_vs_{other}"] = round(rate["fast"] / rate[other], 3)
    return result


def contenders(check: Check, spec: ModelSpec, module: ESM2, toks: int
               ) -> list[tuple[str, Callable[[list[str]], tuple[Any, int]]]]:
    """(label, run) pairs; each run returns (rows, padded tokens or 0 for our plan's)."""
    common = {"toks_per_batch": toks, "truncation": 1022, "device": check.device}
    alphabet = module.alphabet
    out: list[tuple[str, Callable[[list[str]], tuple[Any, int]]]] = []
    fair_dtypes = [check.half]
    if check.cuda and spec.size == "650M":
        fair_dtypes.append(torch.float32)  # the goal is read against fair-esm's fp32 loop
    for dtype in fair_dtypes:
        fair = copy.deepcopy(module).to(dtype)
        label = f"fairesm_{'fp16' if dtype == torch.float16 else 'fp32'}"
        out.append((label, lambda s, m=fair: bench.fair_esm_extract(m, alphabet, s, **common)))
    hf = bench.transformers_model(module, check.device, check.half)
    if hf is not None:
        out.append(("transformers_sdpa",
                    lambda s: bench.transformers_extract(hf, alphabet, s, **common)))
    model = ours(module, spec, check.half)
    out.append(("fast", lambda s: (embed_sequences(model, s, toks_per_batch=toks), 0)))
    return out


def speed(check: Check) -> Section:
    result: Section = {}
    for size in ("650M", "3B"):
        if check.elapsed() > check.args.budget_s:
            result[size] = {"skipped": "time budget spent"}
            continue
        try:
            result[size] = speed_at(check, size)
        except Exception as exc:  # the other size still runs
            result[size] = {"error": f"{type(exc).__name__}: {exc}"}
        release(check.device)
    return result


def oom(check: Check) -> Section:
    if not check.cuda:
        return {"skipped": "needs CUDA (set_per_process_memory_fraction); the halving logic "
                           "is tested on CPU with an injected OOM (tests/embedding/test_oom.py)"}
    spec = check.spec("650M")
    module = random_module(spec, check.device, check.args.seed)
    model = ours(module, spec, torch.float16)
    del module
    release(check.device)
    sequences = [s[:1022] for s in proteins(160, check.args.seed + 3)]
    toks = 131_072
    want = embed_sequences(model, sequences, toks_per_batch=toks)
    calls: list[int] = []
    forward = embed_module.representations

    def counting(loaded: LoadedModel, tokens: torch.Tensor, *, layer: int) -> torch.Tensor:
        calls.append(tokens.shape[0])
        return forward(loaded, tokens, layer=layer)

    total = torch.cuda.get_device_properties(check.device).total_memory
    allowed = torch.cuda.memory_allocated(check.device) + int(1.5 * 2**30)
    embed_module.representations = counting  # type: ignore[assignment]
    torch.cuda.set_per_process_memory_fraction(allowed / total, check.device)
    try:
        release(check.device)
        got = embed_sequences(model, sequences, toks_per_batch=toks)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, check.device)
        embed_module.representations = forward
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    planned = len(plan_batches([len(s) for s in sequences], toks_per_batch=toks).batches)
    return {"arch": spec.name, "n_seqs": len(sequences), "toks_per_batch": toks,
            "memory_fraction": round(allowed / total, 4),
            "batches_planned": planned, "forward_calls": len(calls),
            "halved": len(calls) > planned, "smallest_batch": min(calls),
            **compare(got, want)}


def end_to_end(check: Check) -> Section:
    queries = list(read_gene_list(ROOT / "data" / "hvg_pbmc3k_seurat_v3_top2000.txt").genes)
    spec = check.spec("650M")
    if check.quick:
        queries = queries[:20]
    model = ours(random_module(spec, check.device, check.args.seed), spec, check.half)
    options = argparse.Namespace(coding=3 if check.quick else 6, latency=0.2,
                                 server_rate=15.0, rate_limit=15.0,
                                 toks_per_batch=8192 if check.quick else 32768)
    with tempfile.TemporaryDirectory(prefix="device-check-") as work:
        result, _ = bench_pipeline.measure(queries, model, options, Path(work))
    result.pop("machine", None)
    return result


def ray(check: Check) -> Section:
    try:
        import ray as _ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray is not installed"}
    from esm2_batch.models import load_model
    from esm2_batch.run.ray_stage import RayOptions, embed_on_ray, shutdown
    from tests.fakes.tiny_esm import write_random_checkpoint, write_tiny_checkpoint

    sequences = [s[:1022] for s in proteins(16 if check.quick else 200, check.args.seed + 4)]
    options = EmbedOptions(toks_per_batch=8192)
    rows: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="device-check-ray-") as work:
        path = (write_tiny_checkpoint(Path(work), num_layers=2, embed_dim=32) if check.quick
                else write_random_checkpoint(Path(work), size="35M"))
        single = embed_sequences(load_model(path, device=check.device), sequences,
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
                options=RayOptions(address="local", actors=1, device=str(check.device),
                                   rows_per_task=16, local_cpus=2 if check.quick else None))
            shutdown()
    assert isinstance(single, torch.Tensor)
    got = torch.stack([rows[str(i)] for i in range(len(sequences))])
    return {"arch": path.stem, "n_seqs": len(sequences), "wall_s": round(stats.wall_s, 1),
            **compare(got, single)}


def goals(report: dict[str, Any]) -> Section:
    """The issue's targets next to what this run measured (None where not measured)."""
    speed650 = report.get("speed", {}).get("650M", {})
    e2e = report.get("end_to_end", {})
    measured = {
        "speedup_fast_fp16_vs_fairesm_fp32_650M": speed650.get("speedup_fast_vs_fairesm_fp32"),
        "speedup_fast_vs_transformers_fp16_650M":
            speed650.get("speedup_fast_vs_transformers_sdpa"),
        "mfu_fast_650M": speed650.get("fast", {}).get("mfu"),
        "end_to_end_2000_genes_650M_s": e2e.get("e2e_s") if e2e.get("genes") == 2000 else None,
    }
    return {name: {"goal": goal, "measured": measured[name],
                   "met": None if measured[name] is None else (
                       measured[name] <= goal if name.endswith("_s")
                       else measured[name] >= goal)}
            for name, goal in GOALS.items()}


def main() -> int:
    args = parse_args()
    check = Check(args)
    if check.cuda and not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA is not available: use --quick on CPU"}))
        return 2
    check.report["machine"] = bench.machine_info(check.device, 0.0)
    for name, body in (("parity", parity), ("speed", speed), ("oom", oom),
                       ("end_to_end", end_to_end), ("ray", ray)):
        check.section(name, body)
    check.report["goals"] = (goals(check.report) if not check.quick else
                             {"skipped": "goals are read on CUDA at the published sizes"})
    check.save()
    print(json.dumps(check.report))
    failed = [k for k, v in check.report.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
