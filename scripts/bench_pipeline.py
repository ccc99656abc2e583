"""End-to-end benchmark: the real 2000-gene HVG list through the fake Ensembl and a
random-weight ESM2 on this machine, with the stages alone for comparison.

Reports (JSON last): fetch-only wall, embed-only wall (the same isoforms from a FASTA,
no network), the end-to-end wall with both overlapped, and
`overlap_ratio` = end_to_end / max(fetch_only, embed_only) (1.0 = perfect overlap).

    python scripts/bench_pipeline.py                 # 8M, CPU, 200 ms, 15 req/s
    python scripts/bench_pipeline.py --size 650M --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
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
from esm2_batch.sources.ensembl_rest import EnsemblClient
from esm2_batch.sources.isoforms_fasta import write_isoforms_fasta
from tests.fakes.ensembl import FakeEnsembl, genes_for_symbols
from tests.fakes.tiny_esm import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hvg_file", type=Path, default=ROOT / "data" /
                   "hvg_pbmc3k_seurat_v3_top2000.txt")
    p.add_argument("--genes", type=int, default=None, help="use only the first N genes")
    p.add_argument("--size", default="8M")
    p.add_argument("--device", default="cpu")
    p.add_argument("--coding", type=int, default=6)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--server_rate", type=float, default=15.0)
    p.add_argument("--rate_limit", type=float, default=15.0)
    p.add_argument("--toks_per_batch", type=int, default=8192)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    queries = list(read_gene_list(args.hvg_file).genes)[: args.genes]
    work = Path(tempfile.mkdtemp(prefix="esm2-bench-"))
    model = load_model(write_random_checkpoint(work, size=args.size), device=args.device)
    result, e2e = measure(queries, model, args, work)
    print("\n".join(e2e.lines()))
    print(f"fetch only {result['fetch_only_s']:.1f} s, embed only {result['embed_only_s']:.1f} "
          f"s, end to end {result['e2e_s']:.1f} s -> {result['overlap_ratio']:.2f}x the "
          "slower stage")
    print(json.dumps(result))


def measure(queries: list[str], model: LoadedModel, args: argparse.Namespace,
            work: Path) -> tuple[dict[str, Any], RunSummary]:
    """Fetch alone, embed alone (the fetched isoforms from a FASTA) and both overlapped,
    `queries` through the fake Ensembl (`args`: coding, latency, server_rate, rate_limit,
    toks_per_batch) into files under `work`; the figures and the end-to-end summary."""
    table = genes_for_symbols(queries, coding=args.coding, nmd=1)
    hvg = work / "hvg.txt"
    hvg.write_text("\n".join(queries) + "\n")
    fake = FakeEnsembl(table, rate_limit=args.server_rate, latency=args.latency,
                       bandwidth=5e6)
    with fake.running_in_thread() as url:
        rest = SourceOptions(ensembl_url=url, rate_limit=args.rate_limit)
        # row cache off: the embed-only run would read the rows the e2e run just cached
        base = RunConfig(hvg_file=hvg, source=rest,
                         embed=EmbedOptions(toks_per_batch=args.toks_per_batch),
                         stage=StageOptions(progress=False, cache=False))
        fetch_only = _fetch_only(url, queries, args, work / "isoforms.fa")
        e2e = run(replace(base, output=OutputOptions(out=work / "e2e.pt")), model=model)
    embed = run(replace(base, output=OutputOptions(out=work / "embed.pt"),
                        source=SourceOptions(isoforms=work / "isoforms.fa")), model=model)
    slower = max(fetch_only, embed.wall_s)
    result = {
        "genes": len(queries), "resolved": e2e.resolved, "not_found": len(e2e.not_found),
        "isoforms": e2e.isoforms, "tokens": e2e.tokens, "arch": model.name,
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "requests": fake.counts["requests"], "n429": fake.counts["429"],
        "fetch_only_s": round(fetch_only, 2), "embed_only_s": round(embed.wall_s, 2),
        "e2e_s": round(e2e.wall_s, 2), "e2e_fetch_s": round(e2e.fetch_s, 2),
        "e2e_embed_busy_s": round(e2e.embed_s, 2),
        "tokens_per_s": round(e2e.tokens_per_s, 1),
        "overlap_ratio": round(e2e.wall_s / slower, 3),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.node()}",
    }
    return result, e2e


def _fetch_only(url: str, queries: list[str], args: argparse.Namespace, fasta: Path) -> float:
    async def fetch() -> list:
        async with EnsemblClient(base_url=url, rate_limit=args.rate_limit) as client:
            return await client.fetch_isoforms(queries)

    start = time.perf_counter()
    genes = asyncio.run(fetch())
    wall = time.perf_counter() - start
    write_isoforms_fasta(fasta, genes)
    return wall


if __name__ == "__main__":
    main()
