"""Time `inspect` and `report` on a proteome-sized esm_all.pt (synthetic: 20,000 genes,
90,000 isoforms, dim 1280 as ESM2-650M), and print the page's size.

    python scripts/bench_report.py [--genes 20000] [--isoforms 90000] [--dim 1280]

The file is made of random vectors with gene structure (isoforms near their canonical
row, genes in loose families) so the plots have something to show; meta carries lengths,
statuses and symbols as a real run records them. Figures print as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # not scripts/esm2_batch.py

import torch

from esm2_batch.outputs.inspect import inspect_file
from esm2_batch.outputs.report import write_report
from esm2_batch.store.esm_file import write_esm_file


def synthetic(genes: int, isoforms: int, dim: int, seed: int = 0) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.ones(genes, dtype=torch.long)
    extra = torch.randint(0, genes, (isoforms - genes,), generator=generator)
    counts += torch.bincount(extra, minlength=genes)
    families = torch.randn(genes // 20 + 1, dim, generator=generator)
    canonical = families[torch.arange(genes) // 20] + 0.6 * torch.randn(genes, dim,
                                                                      generator=generator)
    owner = torch.repeat_interleave(torch.arange(genes), counts)  # [R]
    emb = canonical[owner] + 0.3 * torch.randn(len(owner), dim, generator=generator)
    names = [f"GENE{i:05d}" for i in range(genes)]
    index, start = {}, 0
    for name, n in zip(names, counts.tolist(), strict=True):
        index[name] = list(range(start, start + n))
        start += n
    ids = [f"ENSP{i:011d}" for i in range(len(owner))]
    lengths = torch.exp(torch.randn(len(owner), generator=generator) * 0.7 + 6.0)
    return {"emb": emb.half(), "genes": names, "protein_ids": ids,
            "gene_to_isoform_indices": index,
            "meta": {"model": "esm2_t33_650M_UR50D", "truncation": 1022, "layer": 33,
                     "pooling": "mean", "species": "homo_sapiens",
                     "status": dict.fromkeys(names, "ok"),
                     "protein_lengths": {p: int(n) for p, n in zip(ids, lengths.tolist(),
                                                                  strict=True)}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--genes", type=int, default=20000)
    parser.add_argument("--isoforms", type=int, default=90000)
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "esm_all.pt"
        write_esm_file(path, synthetic(args.genes, args.isoforms, args.dim))
        start = time.perf_counter()
        facts = inspect_file(path)
        inspect_s = time.perf_counter() - start
        start = time.perf_counter()
        result = write_report(path, Path(work) / "report.html", genes=["GENE00001"])
        report_s = time.perf_counter() - start
        print(json.dumps({"machine": f"{platform.machine()} {platform.processor()}",
                          "genes": args.genes, "isoforms": args.isoforms, "dim": args.dim,
                          "file_mb": round(path.stat().st_size / 1e6, 1),
                          "inspect_s": round(inspect_s, 2), "report_s": round(report_s, 2),
                          "page_mb": round(result.bytes / 1e6, 2),
                          "map_points": result.map_points,
                          "distinct": facts["isoforms"]["distinct_sequences"]}))


if __name__ == "__main__":
    main()
