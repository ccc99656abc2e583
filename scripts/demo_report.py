"""The README's inspect output and report screenshot: data/'s real 2,000-gene HVG list
through the fake Ensembl (3 coding + 1 NMD isoforms per gene, lengths log-normal) and a
random-weight ESM2 8M on this machine, then `inspect` and `report` on the result.

    python scripts/demo_report.py --work /tmp/demo   # writes esm_all.pt, report.html there

Random weights: the neighbours and the map show structure only where sequences share it,
so this shows what the page looks like, not what a trained model's vectors mean.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # not scripts/esm2_batch.py

from esm2_batch import load_model, read_gene_list
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.outputs.inspect import inspect_file, summary_lines
from esm2_batch.outputs.report import write_report
from esm2_batch.run.config import OutputOptions, RunConfig
from esm2_batch.run.gene_mode import run
from esm2_batch.run.stages import StageOptions
from esm2_batch.sources.base import SourceOptions
from tests.fakes.ensembl import FakeEnsembl, genes_for_symbols
from tests.fakes.tiny_esm import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--size", default="8M")
    parser.add_argument("--genes", type=int, default=None, help="only the first N genes")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    hvg = ROOT / "data" / "hvg_pbmc3k_seurat_v3_top2000.txt"
    queries = list(read_gene_list(hvg).genes)[: args.genes]
    (args.work / "hvg.txt").write_text("\n".join(queries) + "\n")
    model = load_model(write_random_checkpoint(args.work, size=args.size), device="cpu")
    out = args.work / "esm_all.pt"
    with FakeEnsembl(genes_for_symbols(queries, coding=3, nmd=1)).running_in_thread() as url:
        run(RunConfig(hvg_file=args.work / "hvg.txt",
                      source=SourceOptions(ensembl_url=url, rate_limit=1000.0),
                      embed=EmbedOptions(toks_per_batch=8192),
                      stage=StageOptions(progress=False, cache=False),
                      output=OutputOptions(out=out, overwrite=True)), model=model)
    print("$ esm2-batch inspect esm_all.pt")
    print("\n".join(summary_lines(inspect_file(out))))
    start = time.perf_counter()
    result = write_report(out, args.work / "report.html", hvg_file=args.work / "hvg.txt")
    print(f"$ esm2-batch report esm_all.pt --out report.html  ({time.perf_counter() - start:.1f}"
          f" s)\n{result.describe()}")


if __name__ == "__main__":
    main()
