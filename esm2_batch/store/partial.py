"""The resumable partial store: the work of an unfinished run, in `<out>.partial/`.

Everything here keeps one promise: a crash at any instant loses nothing that was
finished, and never leaves a half-written file under a name that a reader trusts (every
file goes through store.atomic, the isoform log is appended and fsynced line by line).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from esm2_batch.errors import StoreError
from esm2_batch.records import GeneIsoforms
from esm2_batch.store.atomic import atomic_json, atomic_save

SETTINGS_FILE = "settings.json"
ISOFORMS_FILE = "isoforms.jsonl"
ROWS_DIR = "rows"


def sequence_key(sequence: str) -> str:
    """Rows are keyed by sequence: identical proteins of different genes embed once."""
    return hashlib.sha1(sequence.encode("ascii")).hexdigest()


class PartialStore:
    """The work of an unfinished run, in `<out>.partial/`.

    settings.json   what the rows depend on (model, layer, pooling, truncation, ...);
                    a rerun with other settings is refused unless overwrite=True
    isoforms.jsonl  one fetched GeneIsoforms per line, appended and fsynced as it comes
    rows/NNNNNN.pt  {"keys": [sequence_key], "emb": float16 [k, dim]}, one per flush,
                    each written to a temporary name and renamed
    """

    def __init__(self, directory: Path, settings: dict[str, Any], *,
                 overwrite: bool = False) -> None:
        self.directory = directory
        self.settings = settings
        self._prepare(overwrite)
        self._next_chunk = len(self._chunk_files())

    def _prepare(self, overwrite: bool) -> None:
        settings_path = self.directory / SETTINGS_FILE
        if settings_path.is_file():
            old = json.loads(settings_path.read_text())
            if old != self.settings:
                if not overwrite:
                    raise StoreError(
                        f"{self.directory}: holds an unfinished run with other settings "
                        f"({describe_difference(old, self.settings)}); rerun with the same "
                        "settings to resume, or pass --overwrite to start again")
                shutil.rmtree(self.directory)
        (self.directory / ROWS_DIR).mkdir(parents=True, exist_ok=True)
        if not settings_path.is_file():
            atomic_json(settings_path, self.settings)

    # -- fetched isoforms ----------------------------------------------------------------
    def cached_genes(self) -> dict[str, GeneIsoforms]:
        """Genes fetched by earlier attempts; a torn last line (a crash) is cut off."""
        path = self.directory / ISOFORMS_FILE
        if not path.is_file():
            return {}
        raw = path.read_bytes()
        good_end = raw.rfind(b"\n") + 1
        if good_end < len(raw):
            with open(path, "r+b") as handle:
                handle.truncate(good_end)
        genes = (GeneIsoforms.from_dict(json.loads(line))
                 for line in raw[:good_end].decode().splitlines() if line.strip())
        return {gene.query: gene for gene in genes}

    def append_genes(self, genes: Iterable[GeneIsoforms]) -> None:
        lines = "".join(json.dumps(g.to_dict()) + "\n" for g in genes)
        if not lines:
            return
        with open(self.directory / ISOFORMS_FILE, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    # -- embedded rows -------------------------------------------------------------------
    def _chunk_files(self) -> list[Path]:
        return sorted((self.directory / ROWS_DIR).glob("[0-9]*.pt"))

    def add_rows(self, keys: list[str], emb: torch.Tensor) -> None:
        """Persist rows (stored float16, as in the final file) under the next chunk name."""
        if not keys:
            return
        chunk = {"keys": list(keys), "emb": emb.detach().to("cpu", torch.float16).contiguous()}
        atomic_save(chunk, self.directory / ROWS_DIR / f"{self._next_chunk:06d}.pt")
        self._next_chunk += 1

    def load_rows(self) -> dict[str, torch.Tensor]:
        """Every row embedded so far, by sequence key."""
        rows: dict[str, torch.Tensor] = {}
        for path in self._chunk_files():
            chunk = torch.load(path, map_location="cpu", weights_only=True)
            rows.update(zip(chunk["keys"], chunk["emb"], strict=True))
        return rows

    def embedded_keys(self) -> set[str]:
        return set(self.load_rows())

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:4])
