"""Whole-proteome benchmark: `esm2-batch --all_genes` over synthetic Ensembl files, peak
RSS and wall time per size, to show memory does not grow with the number of proteins.

For each size N (proteins), it writes Ensembl-style files (pep.all.fa.gz and
canonical.tsv.gz, as sources/ensembl_files.py reads them) with genes of one or two
proteins of 50-200 residues, and runs the real command in a child process:

    python -m esm2_batch --all_genes --ensembl_files DIR --model_path CKPT --device cpu

with a random-weight ESM2 checkpoint of `--arch` in fair-esm's layout. `--ray local`
(and `--ray_actors N`) runs the embedding stage on a one-machine Ray cluster instead.

Peak RSS is the driver's own: the child runs the CLI under a small launcher that writes
getrusage(RUSAGE_SELF).ru_maxrss at exit (the kernel's high-water mark of that process
alone). Not os.wait4's figure: that one also takes the peak of every descendant the child
reaped, and with Ray those are the raylet and its workers, which would hide the driver.
Every size runs in a fresh interpreter, so the figures compare within one run of this
script. `--per_tok` also runs each size with `--include mean per_tok` (residue states
written to the residue store, never accumulated in memory). The summary line gives the
ratio peak RSS largest / smallest size; JSON is the last line.

    python scripts/bench_proteome.py [--sizes 2000 20000] [--arch 8M] [--per_tok]
                                     [--ray local] [--ray_actors 1]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the path line, as the other benchmarks)

from scripts.bench_embed import cpu_model  # noqa: E402
from tests.fakes.tiny_esm import write_random_checkpoint  # noqa: E402

AMINO = "ACDEFGHIKLMNPQRSTVWY"
ASSEMBLY, RELEASE = "GRCh38", 110


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000],
                   help="proteins per run (default 2000 20000)")
    p.add_argument("--arch", default="8M", help="ESM2 architecture, random weights")
    p.add_argument("--per_tok", action="store_true",
                   help="also run every size with --include mean per_tok")
    p.add_argument("--ray", default=None,
                   help="embed on Ray (local: a one-machine cluster), as esm2-batch --ray")
    p.add_argument("--ray_actors", type=int, default=None, help="Ray actors (with --ray)")
    p.add_argument("--toks_per_batch", type=int, default=4096)
    p.add_argument("--min_len", type=int, default=50)
    p.add_argument("--max_len", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None,
                   help="scratch directory (default: a new temporary one, removed after)")
    return p.parse_args()


def write_files(directory: Path, n_proteins: int, *, min_len: int, max_len: int,
                seed: int) -> int:
    """Ensembl's pep.all and canonical files for genes of one or two proteins (every
    third gene has two), `n_proteins` in all; returns the number of genes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pep = directory / f"Homo_sapiens.{ASSEMBLY}.pep.all.fa.gz"
    canonical = directory / f"Homo_sapiens.{ASSEMBLY}.{RELEASE}.canonical.tsv.gz"
    gene = protein = 0
    with gzip.open(pep, "wt", compresslevel=1) as fa, \
            gzip.open(canonical, "wt", compresslevel=1) as tsv:
        while protein < n_proteins:
            gene += 1
            gene_id = f"ENSG{gene:011d}"
            count = min(2 if gene % 3 == 0 else 1, n_proteins - protein)
            for k in range(count):
                protein += 1
                tx = f"ENST{protein:011d}"
                length = rng.randint(min_len, max_len)
                sequence = "M" + "".join(rng.choices(AMINO, k=length - 1))
                start = 1000 + gene * 100
                fa.write(f">ENSP{protein:011d}.1 pep chromosome:{ASSEMBLY}:{1 + gene % 22}:"
                         f"{start}:{start + 5000}:1 gene:{gene_id}.1 transcript:{tx}.1 "
                         "gene_biotype:protein_coding transcript_biotype:protein_coding "
                         f"gene_symbol:SYN{gene} description:synthetic\n")
                fa.write("".join(sequence[i:i + 60] + "\n" for i in range(0, length, 60)))
                if k == 0:
                    tsv.write(f"{gene_id}.1\t{tx}.1\tEnsembl Canonical\n")
    return gene


LAUNCHER = """
import atexit, resource, runpy, sys
peak_file = sys.argv.pop(1)
def write_peak():
    with open(peak_file, "w") as out:
        out.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
atexit.register(write_peak)
runpy.run_module("esm2_batch", run_name="__main__", alter_sys=True)
"""
"""Runs `python -m esm2_batch ARGS` and, at exit, writes this process's own peak RSS
(kilobytes on Linux) to the file named by its first argument."""


def run_child(args: list[str], env: dict[str, str], peak_file: Path
              ) -> tuple[int, float, int]:
    """Run esm2-batch with `args`; (exit code, wall seconds, peak RSS in bytes of the
    driver process itself, not of the processes it started)."""
    start = time.perf_counter()
    command = [sys.executable, "-c", LAUNCHER, str(peak_file), *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, err = proc.communicate()  # drained while it runs: a full pipe would block it
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(err.decode("utf-8", "replace"))
        return proc.returncode, wall, 0
    return proc.returncode, wall, int(peak_file.read_text()) * 1024  # Linux: kilobytes


def main() -> None:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="esm2-proteome-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "model").mkdir(exist_ok=True)  # a directory gets fair-esm's file name
    checkpoint = write_random_checkpoint(work / "model", size=args.arch)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    variants = [False, True] if args.per_tok else [False]
    results: list[dict[str, Any]] = []
    try:
        for n in args.sizes:
            files = work / f"ensembl_{n}"
            genes = write_files(files, n, min_len=args.min_len, max_len=args.max_len,
                                seed=args.seed)
            for per_tok in variants:
                out = work / f"run_{n}{'_per_tok' if per_tok else ''}" / "esm_all.pt"
                out.parent.mkdir(parents=True, exist_ok=True)
                command = ["--all_genes",
                           "--ensembl_files", str(files), "--model_path", str(checkpoint),
                           "--device", "cpu", "--out", str(out), "--toks_per_batch",
                           str(args.toks_per_batch), "-q"]
                if per_tok:
                    command += ["--include", "mean", "per_tok"]
                if args.ray:
                    command += ["--ray", args.ray]
                if args.ray_actors:
                    command += ["--ray_actors", str(args.ray_actors)]
                # an empty row cache of its own: every run embeds (and caches) all rows
                cache = {"ESM2_BATCH_CACHE_DIR": str(out.parent / "row_cache")}
                code, wall, rss = run_child(command, {**env, **cache},
                                             out.parent / "peak_rss_kb")
                if code != 0:
                    raise SystemExit(f"esm2-batch exited {code} for {n} proteins")
                rows = int(torch.load(out, weights_only=True)["emb"].shape[0])
                result = {"proteins": n, "genes": genes, "rows": rows, "per_tok": per_tok,
                          "wall_s": round(wall, 2), "peak_rss_mb": round(rss / 2**20, 1),
                          "proteins_per_s": round(n / wall, 1),
                          "esm_all_mb": round(out.stat().st_size / 2**20, 2),
                          "load_avg": [round(x, 2) for x in os.getloadavg()]}
                results.append(result)
                print(f"{n:>7} proteins ({genes} genes){' per_tok' if per_tok else ''}: "
                      f"peak RSS {result['peak_rss_mb']} MB, wall {result['wall_s']} s, "
                      f"{result['proteins_per_s']} proteins/s, esm_all.pt "
                      f"{result['esm_all_mb']} MB, load {result['load_avg']}", flush=True)
                shutil.rmtree(out.parent, ignore_errors=True)  # disk: keep only the figures
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ratios: dict[str, float] = {}
    for per_tok in variants:
        mine = [r for r in results if r["per_tok"] == per_tok]
        small, large = min(mine, key=lambda r: r["proteins"]), max(
            mine, key=lambda r: r["proteins"])
        name = f"rss_{large['proteins']}_over_{small['proteins']}" + (
            "_per_tok" if per_tok else "")
        ratios[name] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
        print(f"peak RSS {large['proteins']} / {small['proteins']} proteins"
              f"{' (per_tok)' if per_tok else ''}: {ratios[name]}x for "
              f"{large['proteins'] / small['proteins']:.0f}x the proteins")
    print(json.dumps({"bench": "proteome", "arch": args.arch, "ray": args.ray,
                      "ray_actors": args.ray_actors, "results": results,
                      "ratios": ratios, "torch": str(torch.__version__),
                      "cpus": os.cpu_count(), "cpu": cpu_model(),
                      "python": platform.python_version()}))


if __name__ == "__main__":
    main()
