"""One `<label>.pt` per protein, from a residue store (FASTA mode's `--per_file DIR`).

    tensor       torch.save(float32 [L, dim])  the first stored layer's residue states
                 (the layout of seed esm3_embedding_saving.md)
    esm-extract  torch.save({"label": label, "representations": {layer: [L, dim]},
                 "mean_representations": {layer: [dim]}})  fair-esm esm-extract's
                 per-file layout, every stored layer, keys the absolute layer numbers

The states are the residue store's (float16 precision), handed out as float32;
mean_representations is their float32 mean over residues. Each file is written
atomically; a file that exists is skipped, so a rerun writes only what is missing
(with overwrite, as FASTA mode's --overwrite, it is replaced).

File names: a label is made filename-safe by replacing every character outside
letters, digits, ".", "_" and "-" with "_" (UniProt's "sp|P04637|P53_HUMAN" ->
"sp_P04637_P53_HUMAN"), a leading "." with "_" (no hidden files, no ".."), and cutting it
to 200 characters. Two labels with the same safe name keep the first one written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from esm2_batch.errors import InputError, StoreError
from esm2_batch.store.atomic import atomic_save, check_writable, disk_errors
from esm2_batch.store.residues import ResidueStore

__all__ = ["PER_FILE_FORMATS", "PerFileResult", "check_per_file_dir", "safe_label",
           "write_per_file"]

PER_FILE_FORMATS = ("tensor", "esm-extract")
PerFileFormat = Literal["tensor", "esm-extract"]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME = 200


def safe_label(label: str) -> str:
    """A label as a file name stem (see the module docstring)."""
    name = _UNSAFE.sub("_", label)[:_MAX_NAME]
    if name.startswith("."):
        name = "_" + name[1:]
    return name or "_"


def check_per_file_dir(directory: Path, fmt: str) -> None:
    """Refuse a bad --per_file / --per_file_format before any work (created if missing):
    a file in the way, a directory that cannot be created or is not writable is one
    StoreError line, not an OSError after every input was embedded."""
    if fmt not in PER_FILE_FORMATS:
        raise InputError(f"--per_file_format must be one of {', '.join(PER_FILE_FORMATS)}; "
                         f"got {fmt!r}")
    if directory.exists() and not directory.is_dir():
        raise StoreError(f"{directory}: is a file; --per_file takes a directory")
    try:
        with disk_errors(directory):
            directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{directory}: cannot be created ({exc.strerror or exc}); choose "
                         "another --per_file") from exc
    check_writable(directory / "label.pt", flag="--per_file", example="<label>.pt")


@dataclass
class PerFileResult:
    """How many files a call wrote and how many existed already."""

    written: int = 0
    skipped: int = 0


def write_per_file(store: ResidueStore, directory: Path, fmt: str = "tensor",
                   labels: Iterable[str] | None = None, *, overwrite: bool = False
                   ) -> PerFileResult:
    """Write `<safe label>.pt` for each label of `store` (default: all), one protein in
    memory at a time; existing files are skipped (`overwrite`: replaced)."""
    check_per_file_dir(directory, fmt)
    result = PerFileResult()
    for label in (store if labels is None else labels):
        path = directory / f"{safe_label(label)}.pt"
        if path.exists() and not overwrite:
            result.skipped += 1
            continue
        atomic_save(_content(store, label, fmt), path)
        result.written += 1
    return result


def _content(store: ResidueStore, label: str, fmt: str) -> Any:
    if fmt == "tensor":
        return store.residues(label).to(torch.float32).clone()
    states = {layer: store.residues(label, layer).to(torch.float32).clone()
              for layer in store.layers}
    return {"label": label, "representations": states,
            "mean_representations": {layer: s.mean(0) for layer, s in states.items()}}
