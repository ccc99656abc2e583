"""Benchmark the Ensembl fetch stage against the fake server with real-world timing.

The fake answers like rest.ensembl.org seen from far away: `--latency` seconds per reply
plus transfer time at `--bandwidth` bytes/s, and a token-bucket limit of `--server_rate`
requests/s that answers 429 + Retry-After. The floor for any client is requests /
server_rate; `wall_over_floor` says how close the client gets. JSON is the last line.

    python scripts/bench_fetch.py               # 2000 genes, ~6 coding isoforms each
    python scripts/bench_fetch.py --renamed 80  # 80 of them asked by an outdated name

With --renamed N, N genes are asked for by a previous symbol the server knows only as a
synonym (as SEPT5 for SEPTIN5), so each costs one GET /xrefs/symbol plus shared lookups.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esm2_batch.sources.ensembl_rest import EnsemblClient
from tests.fakes.ensembl import FakeEnsembl, synthetic_genes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--coding", type=int, default=6, help="protein_coding isoforms per gene")
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--bandwidth", type=float, default=5e6, help="reply bytes per second")
    p.add_argument("--server_rate", type=float, default=15.0)
    p.add_argument("--rate_limit", type=float, default=15.0, help="the client's limit")
    p.add_argument("--parallel_workers", type=int, default=10)
    p.add_argument("--renamed", type=int, default=0,
                   help="genes asked for by an outdated symbol (resolved via /xrefs/symbol)")
    return p.parse_args()


async def fetch(url: str, queries: list[str], args: argparse.Namespace) -> tuple[float, dict]:
    start = time.perf_counter()
    async with EnsemblClient(base_url=url, rate_limit=args.rate_limit,
                             parallel_workers=args.parallel_workers) as client:
        genes = await client.fetch_isoforms(queries)
        stats = client.stats
    wall = time.perf_counter() - start
    assert sum(g.status == "ok" for g in genes) == len(queries), "genes lost"
    return wall, stats


def main() -> None:
    args = parse_args()
    genes = synthetic_genes(args.genes, coding=args.coding, nmd=1)
    queries = [g.symbol for g in genes]
    for i in range(args.renamed):  # spread over the list, as renamed genes are in real ones
        gene = genes[i * len(genes) // args.renamed]
        gene.synonyms = [f"OLD{gene.symbol}"]
        queries[genes.index(gene)] = f"OLD{gene.symbol}"
    fake = FakeEnsembl(genes, rate_limit=args.server_rate, latency=args.latency,
                       bandwidth=args.bandwidth)
    with fake.running_in_thread() as url:
        wall, stats = asyncio.run(fetch(url, queries, args))
    requests = fake.counts["requests"]
    floor = requests / args.server_rate
    result = {
        "genes": args.genes, "renamed": args.renamed, "isoforms": args.genes * args.coding,
        "requests": requests, "n429": fake.counts["429"],
        "lookup_requests": fake.counts["lookup"], "sequence_requests": fake.counts["sequence"],
        "retries": stats.get("retries", 0), "wall_s": round(wall, 3),
        "floor_s": round(floor, 3), "wall_over_floor": round(wall / floor, 3),
        "latency_s": args.latency, "server_rate": args.server_rate,
        "client_rate_limit": args.rate_limit, "parallel_workers": args.parallel_workers,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(f"{args.genes} genes: {requests} requests ({result['n429']} x 429) in "
          f"{wall:.2f} s; floor {floor:.2f} s at {args.server_rate:g} req/s -> "
          f"{result['wall_over_floor']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
