"""The esm2-batch command's flags: their types, help texts and value parsers.

Kept apart from cli.py (the commands) so that each command reads as what it does; every
flag has the underscore spelling of the seed (`--hvg_file`) and the dash one
(`--hvg-file`). Parsers turn a flag's text into the typed value the library takes, or a
typer usage error (exit 2) naming the flag.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer

from esm2_batch.embedding.options import AUTO_TOKENS  # no torch: the CLI starts fast

_POOLER_WORD = r"mean|bos|max|std|per_tok"
LIST_FLAGS = {"--repr_layers": r"-?\d+", "--repr-layers": r"-?\d+",
              "--include": _POOLER_WORD}
"""Flags that take several space-separated values, as esm-extract's (nargs='+'), and the
pattern a following word must match to be one of them (a file name never is)."""


def join_list_flags(args: list[str]) -> list[str]:
    """`--repr_layers 20 -1` -> `--repr_layers 20,-1`: click options take one value each
    (and would read -1 as a flag), so the words after a list flag are joined first."""
    out: list[str] = []
    pattern: str | None = None  # set while the words after a list flag are read
    for arg in args:
        if pattern is not None and re.fullmatch(pattern, arg):
            if out[-1] in LIST_FLAGS:
                out.append(arg)  # the first value
            else:
                out[-1] = f"{out[-1]},{arg}"
            continue
        pattern = LIST_FLAGS.get(arg)
        out.append(arg)
    return out


MODEL_SIZES = ("8M", "35M", "150M", "650M", "3B", "15B")


def option(*names: str, help: str, **kw: object) -> typer.models.OptionInfo:
    """An option with its dash spelling added: --hvg_file also answers to --hvg-file."""
    dashed = [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]
    option: typer.models.OptionInfo = typer.Option(
        *names, *dashed, help=help, **kw)  # type: ignore[arg-type]  # typer types **kw loosely
    return option


Verbose = Annotated[int, typer.Option("-v", "--verbose", count=True, help="More log output.")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Only errors (and which CSV/TSV "
                                     "column held the genes); no progress bars.")]
ModelSize = Annotated[str, option("--model_size", help=f"ESM2 size: {', '.join(MODEL_SIZES)}.")]
ModelPath = Annotated[Path | None, option(
    "--model_path", help="A local ESM2 checkpoint in fair-esm's layout (instead of the size; "
    "works offline).")]
EngineOpt = Annotated[str, option(
    "--engine", help="fast (the project's ESM2 forward) or reference (fair-esm's own). In "
    "fp32 their pooled rows agree within 1e-6 and per-residue states within 1e-5 (float32 "
    "rounding; README: Performance).")]
BackendOpt = Annotated[str, option(
    "--backend", help="auto (from --model_size/--model_path), fair-esm, hf (ESM2 in the "
    "Hugging Face layout: a folder or a hub id in the local HF cache), fastesm (Synthyra's "
    "FastESM2), esmc (ESM C) or esm3 (ESM3's sequence track).")]
Device = Annotated[str | None, option("--device", help="cuda or cpu (default: cuda if available).")]
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
DtypeOpt = Annotated[str, option("--dtype", help="Compute precision: auto (fp16 on CUDA, fp32 "
                               "on CPU), fp16, bf16 or fp32. Rows are stored as float16.")]
BatchSize = Annotated[int | None, option("--batch_size", help="Max sequences per batch.")]
def parse_toks(value: str | int) -> int:
    """--toks_per_batch: "auto" (`AUTO_TOKENS`: sized for the device) or a number; a number
    that is not a budget (0) is refused by EmbedOptions with the one-line error."""
    if str(value).strip().lower() == "auto":
        return AUTO_TOKENS
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number of tokens or auto",
                                 param_hint="--toks_per_batch") from None


Toks = Annotated[int, option(
    "--toks_per_batch", parser=parse_toks, metavar="N|auto", show_default="auto",
    help="Token budget per batch (BOS/EOS included; padding too for engines that pad). "
    "auto: sized from free GPU memory on CUDA (recorded in meta['budget']), 4096 on CPU.")]
Truncation = Annotated[int | None, option(
    "--truncation", help="Residues kept per sequence (default: the model's context, 1022 for "
    "ESM2, 2046 for FastESM2, ESM C and ESM3).")]
LongSeqsOpt = Annotated[str, option("--long_seqs", help="truncate (first --truncation residues) "
                                  "or window (overlapping windows over the whole protein).")]
ReprLayers = Annotated[str | None, option(
    "--repr_layers", help="Layers to pool, as esm-extract's: several at once (one forward), "
    "negative counts from the end (default -1, the last), e.g. --repr_layers 20 -1. The "
    "first goes to emb (FASTA: data); the others to emb_<pooler>_layer<L> (data_...).")]
Include = Annotated[str | None, option(
    "--include", help="Poolers, several at once: mean (default), bos, max, std (per channel "
    "over residues only, no BOS/EOS/padding), e.g. --include mean max. The first at the "
    "first layer is emb. per_tok also writes every residue's state per layer to a residue "
    "store (<out stem>.residues/, FASTA: <stem>_residues/), with or without --ray.")]
RayAddress = Annotated[str | None, option(
    "--ray", help="Embed on Ray: 'local' (start one on this machine), 'auto' (join "
    "$RAY_ADDRESS) or a cluster address. Needs the [ray] extra.")]
RayActors = Annotated[int | None, option("--ray_actors", help="Ray actors (default: one per "
                                       "GPU, or CPUs / 2).")]
GenePooling = Annotated[str, option("--gene_pooling", help="One vector per gene: canonical "
                                  "(the canonical isoform) or mean (all isoforms).")]
Overwrite = Annotated[bool, option("--overwrite", help="Replace an existing output or an "
                                 "unfinished run with other settings.")]
CacheDir = Annotated[Path | None, option(
    "--cache_dir", help="The row cache shared across runs (default $ESM2_BATCH_CACHE_DIR, "
    "else ~/.cache/esm2_batch/rows); keep it on a local disk.")]
NoCache = Annotated[bool, option("--no_cache", help="Neither read nor fill the row cache.")]
IsoformsSetOpt = Annotated[str, option(
    "--isoforms_set", help="all (every isoform of --biotypes) or canonical (only each gene's "
    "canonical isoform: one row per gene, fetched and embedded alone; a later 'all' run "
    "reuses those rows).")]
DryRun = Annotated[bool, option(
    "--dry_run", help="Fetch (or read) the isoforms, load no weights, embed and write "
    "nothing (but --save_isoforms): print the plan (genes, sequences, tokens, what earlier "
    "work holds) and the estimated embedding time on --device.")]
JsonOut = Annotated[bool, option("--json", help="With --dry_run: print the plan as one "
                                 "JSON object.")]


Choice = TypeVar("Choice", bound=str)


def _choice(value: str, choices: tuple[Choice, ...], flag: str) -> Choice:
    """`value` as one of `choices` (typed as their Literal), else typer's usage error."""
    for choice in choices:
        if value == choice:
            return choice
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=flag)


def parse_engine(value: str) -> Literal["fast", "reference"]:
    return _choice(value, ("fast", "reference"), "--engine")


def parse_dtype(value: str) -> str:
    """--dtype checked before any work (a usage error, exit 2, like --engine)."""
    return _choice(value.lower(), DTYPE_CHOICES, "--dtype")


def parse_gene_pooling(value: str) -> Literal["canonical", "mean"]:
    return _choice(value, ("canonical", "mean"), "--gene_pooling")


def parse_isoforms_set(value: str) -> Literal["all", "canonical"]:
    return _choice(value, ("all", "canonical"), "--isoforms_set")


def parse_long_seqs(value: str) -> Literal["truncate", "window"]:
    return _choice(value, ("truncate", "window"), "--long_seqs")


def parse_layers(value: str | None) -> tuple[int, ...]:
    """--repr_layers "20,-1" (join_list_flags made it one word) -> (20, -1)."""
    words = [w for w in (value or "").split(",") if w.strip()]
    try:
        return tuple(int(w) for w in words)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a list of layer numbers (e.g. 20 -1)",
                                 param_hint="--repr_layers") from None


def parse_poolers(value: str | None) -> tuple[Literal["mean", "bos", "max", "std"], ...]:
    """--include "mean,max,per_tok" -> ("mean", "max"): the poolers (per_tok: `_per_tok`)."""
    words = [w.strip() for w in (value or "").split(",") if w.strip() != "per_tok"]
    return tuple(_choice(w, ("mean", "bos", "max", "std"), "--include")
                 for w in words if w)


def parse_per_tok(value: str | None) -> bool:
    """Whether --include names per_tok (alone it still writes the pooled file, with mean)."""
    return "per_tok" in [w.strip() for w in (value or "").split(",")]


def parse_biotypes(value: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not kinds:
        raise typer.BadParameter("give at least one biotype, e.g. protein_coding",
                                 param_hint="--biotypes")
    return kinds


_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6,
               "G": 10**9, "GB": 10**9, "T": 10**12, "TB": 10**12}


def parse_size(text: str | None) -> int | None:
    """'20G', '500MB', '1.5T' or a number of bytes -> bytes (None stays None)."""
    if text is None:
        return None
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or not value >= 0:
        raise typer.BadParameter(f"{text!r} is not a size such as 20G, 500M or 1.5T",
                                 param_hint="--max_size")
    return int(value * _SIZE_UNITS[unit])
