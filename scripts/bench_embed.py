"""Benchmark embed_sequences against fair-esm's own esm-extract loop, in one run.

Both embed the same random proteins (median ~400 residues, a tail past 3,000) with the
same random-weight ESM2 of a published architecture, truncated to 1,022 residues and
mean-pooled over the last layer:

(a) fair-esm as esm-extract runs it: FastaBatchedDataset.get_batch_indices(toks_per_batch,
    extra_toks_per_seq=1) on untruncated lengths, alphabet.get_batch_converter(1022),
    model(tokens, repr_layers=[L]) under no_grad, t[i, 1:n+1].mean(0);
(b) esm2_batch.embed_sequences with the same toks_per_batch.

Tokens/s counts real tokens (kept residues + BOS + EOS) over wall time, the same numerator
for both, so the ratio is the speed-up. The last line printed is a JSON summary.

    python scripts/bench_embed.py --arch 35M --n_seqs 96 --toks_per_batch 4096
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import esm  # noqa: E402

from esm2_batch.batching import SPECIAL_TOKENS, padded_tokens, plan_batches  # noqa: E402
from esm2_batch.embed import embed_sequences  # noqa: E402
from esm2_batch.models import LoadedModel, load_model, read_checkpoint  # noqa: E402
from tests.fakes.tiny_esm import write_random_checkpoint  # noqa: E402

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
T = TypeVar("T")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="35M", help="published ESM2 size, random weights")
    parser.add_argument("--n_seqs", type=int, default=96)
    parser.add_argument("--toks_per_batch", type=int, default=4096)
    parser.add_argument("--truncation", type=int, default=1022)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def protein_lengths(n: int, rng: random.Random) -> list[int]:
    """Log-normal lengths, median 400 like the human proteome, 2% forced past 3,000."""
    lengths = [max(30, min(35_000, round(rng.lognormvariate(6.0, 0.6)))) for _ in range(n)]
    for i in rng.sample(range(n), max(1, n // 50)):
        lengths[i] = rng.randint(3_000, 8_000)
    return lengths


def random_proteins(lengths: list[int], rng: random.Random) -> list[str]:
    """Uniform random residues: speed depends on lengths, not on which letters."""
    return ["".join(rng.choices(AMINO_ACIDS, k=length)) for length in lengths]


def fair_esm_extract(
    module: torch.nn.Module, alphabet: esm.data.Alphabet, sequences: list[str],
    *, toks_per_batch: int, truncation: int, device: torch.device,
) -> tuple[torch.Tensor, int]:
    """esm-extract's loop; returns the rows in input order and the padded token count."""
    labels = [str(i) for i in range(len(sequences))]
    dataset = esm.data.FastaBatchedDataset(labels, sequences)
    batches = dataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(truncation), batch_sampler=batches)
    layer = module.num_layers
    rows: dict[int, torch.Tensor] = {}
    padded = 0
    with torch.no_grad():
        for names, strs, toks in loader:
            padded += toks.numel()
            out = module(toks.to(device), repr_layers=[layer], return_contacts=False)
            reps = out["representations"][layer].to("cpu")
            for i, name in enumerate(names):
                kept = min(truncation, len(strs[i]))
                rows[int(name)] = reps[i, 1 : kept + 1].mean(0).clone()
    return torch.stack([rows[i] for i in range(len(sequences))]), padded


def fair_esm_module(path: Path, device: torch.device) -> tuple[torch.nn.Module, esm.data.Alphabet]:
    """The checkpoint as plain fair-esm builds it (its own rotary and attention)."""
    with warnings.catch_warnings():  # no contact-regression file: irrelevant to embeddings
        warnings.simplefilter("ignore", UserWarning)
        module, alphabet = esm.pretrained.load_model_and_alphabet_core(
            path.stem, read_checkpoint(path), regression_data=None)
    return module.eval().to(device), alphabet


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """fn's result and its wall-clock seconds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    """Time (a) then (b) on the same inputs after a short warm-up of each; print a summary."""
    args = parse_args()
    rng = random.Random(args.seed)
    lengths = protein_lengths(args.n_seqs, rng)
    sequences = random_proteins(lengths, rng)
    kept = [min(n, args.truncation) for n in lengths]
    real_tokens = sum(k + SPECIAL_TOKENS for k in kept)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp), size=args.arch, seed=args.seed)
        ours: LoadedModel = load_model(path, device=device, dtype=torch.float32)
        theirs, alphabet = fair_esm_module(path, device)
    common = dict(toks_per_batch=args.toks_per_batch, truncation=args.truncation)
    warm = sequences[:2]
    fair_esm_extract(theirs, alphabet, [s[:64] for s in warm], device=device, **common)
    embed_sequences(ours, [s[:64] for s in warm], **common)

    (ref, fair_padded), t_fair = timed(fair_esm_extract, theirs, alphabet, sequences,
                                       device=device, **common)
    rows, t_embed = timed(embed_sequences, ours, sequences, **common)
    plan = plan_batches(kept, toks_per_batch=args.toks_per_batch)
    embed_padded = sum(padded_tokens([kept[i] for i in b]) for b in plan.batches)
    assert isinstance(rows, torch.Tensor)
    summary = {
        "arch": args.arch, "n_seqs": args.n_seqs, "toks_per_batch": args.toks_per_batch,
        "truncation": args.truncation, "real_tokens": real_tokens,
        "median_len": sorted(lengths)[len(lengths) // 2], "max_len": max(lengths),
        "seconds_fairesm": round(t_fair, 2), "seconds_embed": round(t_embed, 2),
        "tokens_per_s_fairesm": round(real_tokens / t_fair, 1),
        "tokens_per_s_embed": round(real_tokens / t_embed, 1),
        "speedup_embed_vs_fairesm": round(t_fair / t_embed, 3),
        "padding_fraction": round(1 - real_tokens / embed_padded, 4),
        "padding_fraction_fairesm": round(1 - real_tokens / fair_padded, 4),
        "batches_embed": len(plan.batches),
        "max_abs_diff_vs_fairesm": float((rows - ref).abs().max()),
        "machine": machine_info(device),
    }
    for key, value in summary.items():
        if key != "machine":
            print(f"{key:>28}: {value}")
    print(json.dumps(summary))


def machine_info(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on, so they are never compared across machines."""
    info: dict[str, object] = {
        "device": str(device), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


if __name__ == "__main__":
    main()
