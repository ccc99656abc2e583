"""Scale-out benchmark: tokens/s of the single-process path and of 1 and 2 local Ray
actors on this machine, for a random-weight ESM2 and a realistic length mix.

The Ray figures include actor start-up (each actor loads the model once), which is what
a run pays. JSON is the last line.

    python scripts/bench_scale.py [--arch 8M] [--n_seqs 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.embedding.options import EmbedOptions
from esm2_batch.models import load_model
from esm2_batch.run.ray_stage import RayOptions, embed_on_ray, shutdown
from tests.fakes.tiny_esm import write_random_checkpoint

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="8M")
    p.add_argument("--n_seqs", type=int, default=200)
    p.add_argument("--toks_per_batch", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def length_mix(n: int, seed: int) -> list[str]:
    """Log-normal lengths, median about 400, truncated at 1022 when embedded."""
    rng = random.Random(seed)
    lengths = [max(30, min(6000, int(rng.lognormvariate(6.0, 0.7)))) for _ in range(n)]
    return ["".join(rng.choice(AMINO) for _ in range(k)) for k in lengths]


def main() -> None:
    args = parse_args()
    seqs = length_mix(args.n_seqs, args.seed)
    tokens = sum(min(len(s), 1022) + 2 for s in seqs)
    work = Path(tempfile.mkdtemp(prefix="esm2-scale-"))
    checkpoint = write_random_checkpoint(work, size=args.arch)
    options = EmbedOptions(toks_per_batch=args.toks_per_batch)
    model = load_model(checkpoint, device="cpu")
    start = time.perf_counter()
    embed_sequences(model, seqs, toks_per_batch=options.toks_per_batch)
    single = tokens / (time.perf_counter() - start)
    items = [(str(i), f"s{i}", s) for i, s in enumerate(seqs)]
    per_actors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for actors in (1, 2):
            ray_options = RayOptions(address="local", actors=actors, device="cpu",
                                     rows_per_task=16)
            stats = embed_on_ray(items, model=str(checkpoint), options=ray_options,
                                 embed=options,
                                 on_rows=lambda keys, rows: None,
                                 on_failure=lambda key, name, error: None)
            per_actors[actors] = tokens / stats.wall_s
        shutdown()
    result = {
        "arch": args.arch, "n_seqs": args.n_seqs, "tokens": tokens,
        "tokens_per_s_single": round(single, 1),
        "tokens_per_s_ray_1": round(per_actors[1], 1),
        "tokens_per_s_ray_2": round(per_actors[2], 1),
        "ray_2_over_1": round(per_actors[2] / per_actors[1], 3),
        "ray_2_over_single": round(per_actors[2] / single, 3),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.node()}",
    }
    print(f"single process {single:.0f} tok/s; Ray 1 actor {per_actors[1]:.0f} tok/s; "
          f"2 actors {per_actors[2]:.0f} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
