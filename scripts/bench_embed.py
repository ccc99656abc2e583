"""Benchmark the embedder's engines against fair-esm's own esm-extract loop, in one run.

All three embed the same random proteins (log-normal lengths, median ~400 residues, 2%
between 3,000 and 8,000; fixed seed) with the same random-weight ESM2 of a published
architecture, truncated to 1,022 residues and mean-pooled over the last layer:

(a) fair-esm as esm-extract runs it: FastaBatchedDataset.get_batch_indices(toks_per_batch,
    extra_toks_per_seq=1) on untruncated lengths, alphabet.get_batch_converter(1022),
    model(tokens, repr_layers=[L]) under no_grad, t[i, 1:n+1].mean(0); always fp32
    (on CUDA it also runs in fp16, reported as *_fairesm_fp16);
(b) esm2_batch.embed_sequences with engine="reference" (fair-esm's ESM2.forward);
(c) esm2_batch.embed_sequences with engine="fast" (esm2_batch.models.esm2_fast.FastESM2);
(d) transformers' EsmModel with attn_implementation="sdpa" on the same weights (written in
    the Hugging Face layout), fed the embedder's own length-sorted token-budget batches,
    mean-pooled like (a) (column "transformers"; skipped when transformers is missing).
(b), (c) and (d) run in fp32 on CPU and fp16 on CUDA, with the same toks_per_batch as (a).

Tokens/s counts real tokens (kept residues + BOS + EOS) over wall time, the same numerator
for all, so ratios of tokens/s are speed-ups. The padding fraction is the share of padded
positions among the tokens the forwards process.

FLOPs: only matmul FLOPs of the embedding forward count (multiply-add = 2), per layer,
for a sequence of T tokens (BOS + residues + EOS), embed dim E, F = 4E:

    per token, per layer = 2 * (3E*E + E*E + E*F + F*E)   q/k/v, out, fc1, fc2 = 24 E^2
                         + 2 * T * E                      scores q.k over all heads
                         + 2 * T * E                      probabilities @ v
    sequence             = L * T * (24 E^2 + 4 T E)

Biases, layer norms, GELU, softmax, rotary and the LM head (which (a) and (b) run and
embeddings do not need) are not counted; padded positions are not counted either, so MFU
is useful work. mfu = useful FLOPs / wall time / peak, where peak is the best of several
dense [4096 x E] @ [E x 4E] matmuls in the engines' dtype, measured in the same run on
the same threads (before and after the timed runs; the better one counts).

The last line printed is a JSON summary.

    python scripts/bench_embed.py                 # 35M on CPU, ~2-3 minutes on 2 cores
    python scripts/bench_embed.py --arch 8M
    python scripts/bench_embed.py --device cuda   # 650M, fp16 engines
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esm2_batch.embedding.batching import SPECIAL_TOKENS, padded_tokens, plan_batches  # noqa: E402

if TYPE_CHECKING:
    import esm
    from esm.model.esm2 import ESM2

    from esm2_batch.models import LoadedModel, ModelSpec
    from esm2_batch.models.esm2_fast import FastESM2

# fair-esm, the package's models and the test fakes are imported where they are used:
# scripts/device_check.py imports this module for its length mix and timing helpers on a
# machine that may lack a package, and must reach the point where it can say which.

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
DEFAULT_ARCH = {"cpu": "35M", "cuda": "650M"}
DEFAULT_N_SEQS = {"cpu": 96, "cuda": 2000}
PEAK_ROWS = 4096


@dataclass(frozen=True, slots=True)
class Contender:
    """One way of embedding the proteins: a label, a call returning (rows, padded tokens),
    and the FastESM2 it runs, if any."""

    label: str
    run: Callable[[list[str]], tuple[torch.Tensor, int]]
    engine: FastESM2 | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None,
                        help="published ESM2 size, random weights (default 35M on CPU, "
                             "650M on CUDA)")
    parser.add_argument("--n_seqs", type=int, default=None,
                        help="proteins (default 96 on CPU, 2000 on CUDA)")
    parser.add_argument("--toks_per_batch", type=int, default=4096)
    parser.add_argument("--truncation", type=int, default=1022)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, usually the core count)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each contender, alternating; best counts")
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


def sequence_flops(tokens: int, spec: ModelSpec) -> int:
    """Matmul FLOPs of the forward for one sequence of `tokens` tokens (module docstring)."""
    e = spec.embed_dim
    return spec.num_layers * tokens * (24 * e * e + 4 * tokens * e)


def fair_esm_extract(
    module: torch.nn.Module, alphabet: esm.data.Alphabet, sequences: list[str],
    *, toks_per_batch: int, truncation: int, device: torch.device,
) -> tuple[torch.Tensor, int]:
    """esm-extract's loop; returns the rows in input order and the padded token count."""
    import esm

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
                rows[int(name)] = reps[i, 1 : kept + 1].float().mean(0).clone()
    return torch.stack([rows[i] for i in range(len(sequences))]), padded


def fair_esm_module(
    path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, esm.data.Alphabet]:
    """The checkpoint as plain fair-esm builds it (its own rotary and attention)."""
    import esm

    from esm2_batch.models.weights import read_checkpoint

    with warnings.catch_warnings():  # no contact-regression file: irrelevant to embeddings
        warnings.simplefilter("ignore", UserWarning)
        module, alphabet = esm.pretrained.load_model_and_alphabet_core(
            path.stem, read_checkpoint(path), regression_data=None)
    return module.eval().to(device=device, dtype=dtype), alphabet


def transformers_model(module: ESM2, device: torch.device,
                       dtype: torch.dtype) -> torch.nn.Module | None:
    """transformers' EsmModel (sdpa attention) holding a copy of `module`'s weights under
    transformers' names (as convert_esm.py writes them), on `device` in `dtype`; None when
    transformers is not installed. Built in memory: a 3B would take minutes to save."""
    try:
        from transformers import EsmConfig, EsmModel
    except ImportError:
        return None
    from tests.fakes.tiny_hf import hf_esm2_config, hf_esm2_state

    fields = {k: v for k, v in hf_esm2_config(module).items() if k != "architectures"}
    config = EsmConfig(**fields)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = EsmModel(config, add_pooling_layer=False)
    state = hf_esm2_state(module, prefix="", lm_head=False, inv_freq="model")
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")})
    return model.eval().requires_grad_(False).to(dtype=dtype)


def transformers_extract(
    model: torch.nn.Module, alphabet: esm.data.Alphabet, sequences: list[str],
    *, toks_per_batch: int, truncation: int, device: torch.device,
) -> tuple[torch.Tensor, int]:
    """EsmModel on the embedder's plan (length-sorted, token budget), esm-extract's mean;
    returns the rows in input order and the padded token count."""
    kept = [min(len(s), truncation) for s in sequences]
    rows: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    padded = 0
    with torch.inference_mode():
        for batch in plan_batches(kept, toks_per_batch=toks_per_batch).batches:
            width = max(kept[i] for i in batch) + SPECIAL_TOKENS
            tokens = torch.full((len(batch), width), alphabet.padding_idx, dtype=torch.long)
            tokens[:, 0] = alphabet.cls_idx
            for row, i in enumerate(batch):
                n = kept[i]
                tokens[row, 1 : n + 1] = torch.tensor(alphabet.encode(sequences[i][:n]))
                tokens[row, n + 1] = alphabet.eos_idx
            padded += tokens.numel()
            tokens = tokens.to(device)
            states = model(input_ids=tokens,
                           attention_mask=tokens.ne(alphabet.padding_idx)).last_hidden_state
            states = states.to("cpu")
            for row, i in enumerate(batch):
                rows[i] = states[row, 1 : kept[i] + 1].float().mean(0)
    return torch.stack(rows), padded


def contenders(
    path: Path, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[Contender]:
    """(a) fair-esm's loop in fp32 (and fp16 on CUDA), (b) reference and (c) fast engine,
    (d) transformers' EsmModel with sdpa when transformers is installed."""
    from esm2_batch.embedding.embed import embed_sequences
    from esm2_batch.models import load_model

    common = {"toks_per_batch": args.toks_per_batch, "truncation": args.truncation}
    plan_padded = ours_padded_tokens(args)
    out = []
    fair_dtypes = [torch.float32] + ([torch.float16] if device.type == "cuda" else [])
    for fair_dtype in fair_dtypes:
        module, alphabet = fair_esm_module(path, device, fair_dtype)
        label = "fairesm" if fair_dtype == torch.float32 else "fairesm_fp16"

        def fair(seqs: list[str], m: torch.nn.Module = module,
                 a: esm.data.Alphabet = alphabet) -> tuple[torch.Tensor, int]:
            return fair_esm_extract(m, a, seqs, device=device, **common)

        out.append(Contender(label, fair))
    for engine in ("reference", "fast"):
        model = load_model(path, device=device, dtype=dtype, engine=engine)

        def ours(seqs: list[str], m: LoadedModel = model) -> tuple[torch.Tensor, int]:
            rows = embed_sequences(m, seqs, **common)
            assert isinstance(rows, torch.Tensor)
            return rows, plan_padded(seqs)

        out.append(Contender(engine, ours, model.fast))
    module, alphabet = fair_esm_module(path, torch.device("cpu"), torch.float32)
    hf = transformers_model(module, device, dtype)
    if hf is not None:
        def theirs(seqs: list[str], m: torch.nn.Module = hf,
                   a: esm.data.Alphabet = alphabet) -> tuple[torch.Tensor, int]:
            return transformers_extract(m, a, seqs, device=device, **common)

        out.append(Contender("transformers", theirs))
    return out


def ours_padded_tokens(args: argparse.Namespace) -> Callable[[list[str]], int]:
    """Padded tokens the embedder's plan processes for some sequences (truncate mode)."""
    def padded(seqs: list[str]) -> int:
        kept = [min(len(s), args.truncation) for s in seqs]
        plan = plan_batches(kept, toks_per_batch=args.toks_per_batch)
        return sum(padded_tokens([kept[i] for i in batch]) for batch in plan.batches)
    return padded


def fast_computed_tokens(engine: FastESM2, lengths: list[int],
                         args: argparse.Namespace) -> int:
    """Token positions the fast engine computes for the embedder's plan: it splits each
    batch into chunks and skips the padding past each chunk's longest row."""
    kept = [min(n, args.truncation) for n in lengths]
    total = 0
    for batch in plan_batches(kept, toks_per_batch=args.toks_per_batch).batches:
        real = torch.tensor([kept[i] + SPECIAL_TOKENS for i in batch])  # (B,)
        padding = torch.arange(int(real.max()))[None, :] >= real[:, None]  # (B, T)
        total += sum((rows.stop - rows.start) * width
                     for rows, width in engine.chunks(padding, trim=True))
    return total


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peaks(embed_dim: int, device: torch.device, dtype: torch.dtype,
                  before: dict[torch.dtype, float] | None = None) -> dict[torch.dtype, float]:
    """Matmul peak in fp32 (fair-esm's loop) and in the engines' dtype, each the better
    of now and `before` (a measurement taken earlier in the run)."""
    before = before or {}
    return {d: max(matmul_peak(embed_dim, device, d), before.get(d, 0.0))
            for d in dict.fromkeys((torch.float32, dtype))}


def matmul_peak(embed_dim: int, device: torch.device, dtype: torch.dtype,
                reps: int = 10) -> float:
    """Best FLOP/s of a dense [4096 x E] @ [E x 4E] matmul: the achievable peak here."""
    a = torch.randn(PEAK_ROWS, embed_dim, device=device, dtype=dtype)
    b = torch.randn(embed_dim, 4 * embed_dim, device=device, dtype=dtype)
    best = float("inf")
    for rep in range(reps + 3):  # 3 warm-up runs
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if rep >= 3:
            best = min(best, time.perf_counter() - start)
    return 2 * PEAK_ROWS * embed_dim * 4 * embed_dim / best


def time_all(
    runners: list[Contender], sequences: list[str], repeats: int, device: torch.device
) -> dict[str, tuple[float, torch.Tensor, int]]:
    """Best wall time, rows and padded tokens of each contender; runs alternate so load
    from other processes hits all of them alike."""
    results: dict[str, tuple[float, torch.Tensor, int]] = {}
    for _ in range(repeats):
        for contender in runners:
            synchronize(device)
            start = time.perf_counter()
            rows, padded = contender.run(sequences)
            synchronize(device)
            seconds = time.perf_counter() - start
            if contender.label not in results or seconds < results[contender.label][0]:
                results[contender.label] = (seconds, rows, padded)
    return results


def summarize(
    args: argparse.Namespace, spec: ModelSpec, lengths: list[int],
    results: dict[str, tuple[float, torch.Tensor, int]], peaks: dict[torch.dtype, float],
    dtype: torch.dtype, device: torch.device,
) -> dict[str, Any]:
    """Tokens/s, ratios, padding, MFU and accuracy, as one flat dict."""
    kept = [min(n, args.truncation) + SPECIAL_TOKENS for n in lengths]
    real_tokens = sum(kept)
    flops = sum(sequence_flops(t, spec) for t in kept)
    rate = {label: real_tokens / seconds for label, (seconds, _, _) in results.items()}
    reference_rows = results["fairesm"][1]
    summary: dict[str, Any] = {
        "arch": spec.size, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "dtype_fairesm": "float32", "n_seqs": len(lengths),
        "toks_per_batch": args.toks_per_batch, "truncation": args.truncation,
        "real_tokens": real_tokens, "median_len": sorted(lengths)[len(lengths) // 2],
        "max_len": max(lengths),
    }
    for label, (seconds, rows, padded) in results.items():
        summary[f"seconds_{label}"] = round(seconds, 2)
        summary[f"tokens_per_s_{label}"] = round(rate[label], 1)
        summary[f"padding_fraction_{label}"] = round(1 - real_tokens / padded, 4)
        peak = peaks[torch.float32] if label == "fairesm" else peaks[dtype]
        summary[f"mfu_{label}"] = round(flops / seconds / peak, 3)
        if label != "fairesm":
            summary[f"max_abs_diff_{label}_vs_fairesm"] = float(
                (rows.float() - reference_rows).abs().max())
    summary.update({
        "speedup_fast_vs_fairesm": round(rate["fast"] / rate["fairesm"], 3),
        "speedup_fast_vs_reference": round(rate["fast"] / rate["reference"], 3),
        "speedup_reference_vs_fairesm": round(rate["reference"] / rate["fairesm"], 3),
        "padding_fraction": summary["padding_fraction_fast"],
        "mfu": summary["mfu_fast"],
        "gflop_per_token": round(flops / real_tokens / 1e9, 4),
        "peak_gflop_per_s": round(peaks[dtype] / 1e9, 1),
        "peak_gflop_per_s_fp32": round(peaks[torch.float32] / 1e9, 1),
    })
    if "transformers" in rate:
        summary["speedup_fast_vs_transformers"] = round(rate["fast"] / rate["transformers"], 3)
        summary["speedup_transformers_vs_fairesm"] = round(
            rate["transformers"] / rate["fairesm"], 3)
    if "fairesm_fp16" in rate:
        summary["speedup_fast_vs_fairesm_fp16"] = round(rate["fast"] / rate["fairesm_fp16"], 3)
    return summary


def machine_info(device: torch.device, load_before: float) -> dict[str, object]:
    """What the numbers were measured on, so they are never compared across machines;
    the load averages show whether other processes shared the cores meanwhile."""
    info: dict[str, object] = {
        "device": str(device), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "processor": cpu_model() or platform.processor() or platform.machine(),
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def main() -> None:
    """Warm up, measure the peak, time (a), (b), (c), measure the peak again; print."""
    from esm2_batch.models import ESM2_MODELS
    from tests.fakes.tiny_esm import write_random_checkpoint

    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ESM2_MODELS[args.arch or DEFAULT_ARCH[device.type]]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rng = random.Random(args.seed)
    lengths = protein_lengths(args.n_seqs or DEFAULT_N_SEQS[device.type], rng)
    sequences = random_proteins(lengths, rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp), size=spec.size, seed=args.seed)
        runners = contenders(path, args, device, dtype)
    for contender in runners:  # warm-up: allocator, kernels, lazy init
        contender.run([s[:300] for s in sequences[:4]])
    load_before = os.getloadavg()[0]
    peaks = measure_peaks(spec.embed_dim, device, dtype)
    results = time_all(runners, sequences, args.repeats, device)
    peaks = measure_peaks(spec.embed_dim, device, dtype, before=peaks)
    summary = summarize(args, spec, lengths, results, peaks, dtype, device)
    fast = next(c.engine for c in runners if c.engine is not None)
    computed = fast_computed_tokens(fast, lengths, args)
    summary["padding_fraction_computed_fast"] = round(1 - summary["real_tokens"] / computed, 4)
    summary["machine"] = machine_info(device, load_before)
    for key, value in summary.items():
        if key != "machine":
            print(f"{key:>36}: {value}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
