"""Row-cache benchmark: what a second run over an overlapping gene list costs.

Two HVG lists from the real 2,000-gene list overlap by `--overlap` of their genes (list A
= genes[0:n], list B = genes[n - overlap*n : 2n - overlap*n]). Run A fills an empty row
cache; run B then goes to another --out (another project) twice: with the cache, and with
--no_cache for comparison. A third run, B's new genes alone without the cache, is what
"fetch time plus the new genes only" would cost. All through the fake Ensembl (latency
and rate limit of the real one) and a random-weight ESM2, in one process. JSON is last.

    python scripts/bench_cache.py                         # 8M, 1,000 genes, 50 % overlap
    python scripts/bench_cache.py --size 35M --genes 600
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from esm2_batch import read_gene_list
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.models import LoadedModel, load_model
from esm2_batch.run.config import OutputOptions, RunConfig
from esm2_batch.run.gene_mode import run
from esm2_batch.run.reports import RunSummary
from esm2_batch.run.stages import StageOptions
from esm2_batch.sources.base import SourceOptions
from tests.fakes.ensembl import FakeEnsembl, genes_for_symbols
from tests.fakes.tiny_esm import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hvg_file", type=Path,
                   default=ROOT / "data" / "hvg_pbmc3k_seurat_v3_top2000.txt")
    p.add_argument("--genes", type=int, default=1000, help="genes per list")
    p.add_argument("--overlap", type=float, default=0.5, help="share of B's genes in A")
    p.add_argument("--size", default="8M")
    p.add_argument("--device", default="cpu")
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--rate_limit", type=float, default=15.0)
    p.add_argument("--toks_per_batch", type=int, default=8192)
    return p.parse_args()


def lists(queries: list[str], n: int, overlap: float) -> tuple[list[str], list[str], list[str]]:
    """A, B and B's genes that A does not have."""
    start = n - round(overlap * n)
    a, b = queries[:n], queries[start:start + n]
    return a, b, [q for q in b if q not in set(a)]


def main() -> None:
    args = parse_args()
    queries = list(read_gene_list(args.hvg_file).genes)
    a, b, new = lists(queries, args.genes, args.overlap)
    work = Path(tempfile.mkdtemp(prefix="esm2-bench-cache-"))
    model = load_model(write_random_checkpoint(work, size=args.size), device=args.device)
    runs = measure(model, args, work, a=a, b=b, new=new)
    result = figures(runs, model, args, a=a, b=b, new=new)
    for name, summary in runs.items():
        print(f"{name:>14}: wall {summary.wall_s:6.1f} s (fetch {summary.fetch_s:.1f} s), "
              f"embedded {summary.embedded_now:5d}, from cache {summary.cached_rows:5d}")
    print(f"second run with the cache: {result['b_cached_over_uncached']:.2f}x the uncached "
          f"run's wall, {result['b_cached_over_new_only']:.2f}x the new genes alone")
    print(json.dumps(result))


def measure(model: LoadedModel, args: argparse.Namespace, work: Path, *, a: list[str],
            b: list[str], new: list[str]) -> dict[str, RunSummary]:
    """The four runs (A cold, B cached, B uncached, B's new genes alone), one fake server."""
    fake = FakeEnsembl(genes_for_symbols(sorted({*a, *b}), coding=6, nmd=1),
                       rate_limit=args.rate_limit, latency=args.latency, bandwidth=5e6)
    cache = work / "cache"
    with fake.running_in_thread() as url:
        base = RunConfig(source=SourceOptions(ensembl_url=url, rate_limit=args.rate_limit),
                         embed=EmbedOptions(toks_per_batch=args.toks_per_batch),
                         stage=StageOptions(progress=False, cache_dir=cache))

        def one(name: str, genes: list[str], *, cached: bool) -> RunSummary:
            hvg = work / f"{name}.txt"
            hvg.write_text("\n".join(genes) + "\n")
            config = replace(base, hvg_file=hvg, output=OutputOptions(out=work / f"{name}.pt"),
                             stage=replace(base.stage, cache=cached))
            return run(config, model=model)

        return {"A (cold cache)": one("a", a, cached=True),
                "B (cache)": one("b", b, cached=True),
                "B (no cache)": one("b_uncached", b, cached=False),
                "B's new genes": one("new", new, cached=False)}


def figures(runs: dict[str, RunSummary], model: LoadedModel, args: argparse.Namespace, *,
            a: list[str], b: list[str], new: list[str]) -> dict[str, Any]:
    cached, uncached = runs["B (cache)"], runs["B (no cache)"]
    alone = runs["B's new genes"]
    return {
        "genes_a": len(a), "genes_b": len(b), "new_genes_in_b": len(new),
        "arch": model.name, "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "a_wall_s": round(runs["A (cold cache)"].wall_s, 2),
        "b_cached_wall_s": round(cached.wall_s, 2),
        "b_cached_fetch_s": round(cached.fetch_s, 2),
        "b_cached_embedded": cached.embedded_now, "b_cached_from_cache": cached.cached_rows,
        "b_uncached_wall_s": round(uncached.wall_s, 2),
        "b_uncached_embedded": uncached.embedded_now,
        "new_only_wall_s": round(alone.wall_s, 2), "new_only_embedded": alone.embedded_now,
        "b_cached_over_uncached": round(cached.wall_s / uncached.wall_s, 3),
        "b_cached_over_new_only": round(cached.wall_s / alone.wall_s, 3),
        "latency_s": args.latency, "rate_limit": args.rate_limit,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.node()}",
    }


if __name__ == "__main__":
    main()
