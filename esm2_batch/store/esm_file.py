"""The esm_all.pt file (reader, atomic writer) and the resumable partial store.

Contract (DESIGN.md): a dict with `emb` (float16 [n_rows, dim]), `genes` (queries in
input order), `protein_ids` (one per row), `gene_to_isoform_indices` (every gene; [] when
it has no protein) and `meta`. Only plain types, so it loads with weights_only=True.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from esm2_batch.errors import InputError, StoreError
from esm2_batch.records import GeneIsoforms
from esm2_batch.sources.gene_lists import query_key

REQUIRED_KEYS = ("emb", "genes", "protein_ids", "gene_to_isoform_indices")


@dataclass(frozen=True)
class EsmFile:
    """An esm_all.pt held in memory, checked against the contract."""

    emb: torch.Tensor
    genes: list[str]
    protein_ids: list[str]
    gene_to_isoform_indices: dict[str, list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def rows_of(self, gene: str) -> list[int]:
        """The row indices of a gene, canonical first ([] when it has no protein)."""
        return self.gene_to_isoform_indices.get(gene, [])

    def match_rows(self, genes: Sequence[str]) -> list[list[int] | None]:
        """Each gene's row indices, None when the file does not list it.

        Exact key first, then the gene-list reader's key (Ensembl IDs without version,
        any case), so a model vocabulary of ENSG00000157764.13 finds ENSG00000157764.
        The one rule every consumer (load_esm_matrix, export, h5ad) matches names by.
        """
        index = self.gene_to_isoform_indices
        by_key: dict[str, str] = {}
        for file_gene in index:
            by_key.setdefault(query_key(file_gene), file_gene)
        found: list[list[int] | None] = []
        for gene in genes:
            file_gene = gene if gene in index else by_key.get(query_key(gene))
            found.append(None if file_gene is None else index[file_gene])
        return found


def read_esm_file(path: str | Path) -> EsmFile:
    """Load and validate an esm_all.pt safely (weights_only=True: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such embedding file; run esm2-batch to create it")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"{path}: not a readable esm_all.pt ({reason})") from exc
    return validate(data, source=str(path))


def validate(data: object, *, source: str = "esm_all.pt") -> EsmFile:
    """Check the contract's keys, types and index ranges; raise StoreError if broken."""
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        raise StoreError(f"{source}: not an esm_all.pt (needs keys {list(REQUIRED_KEYS)})")
    emb, protein_ids = data["emb"], list(data["protein_ids"])
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise StoreError(f"{source}: 'emb' must be a 2-D tensor")
    if emb.shape[0] != len(protein_ids):
        raise StoreError(f"{source}: {emb.shape[0]} rows but {len(protein_ids)} protein ids")
    index = {str(g): [int(i) for i in rows]
             for g, rows in data["gene_to_isoform_indices"].items()}
    bad = [g for g, rows in index.items() if any(not 0 <= i < emb.shape[0] for i in rows)]
    if bad:
        raise StoreError(f"{source}: row indices out of range for {bad[:5]}")
    return EsmFile(emb=emb, genes=[str(g) for g in data["genes"]], protein_ids=protein_ids,
                   gene_to_isoform_indices=index, meta=dict(data.get("meta", {})))


# -- writing ---------------------------------------------------------------------------------
# Everything below keeps one promise: a crash at any instant loses nothing that was
# finished, and never leaves a half-written file under a name that a reader trusts.

SETTINGS_FILE = "settings.json"
ISOFORMS_FILE = "isoforms.jsonl"
ROWS_DIR = "rows"


def sequence_key(sequence: str) -> str:
    """Rows are keyed by sequence: identical proteins of different genes embed once."""
    return hashlib.sha1(sequence.encode("ascii")).hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a handle to a temporary name in the same directory, fsync, then
    rename: readers see the old file or the whole new one, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: object, path: Path) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def check_writable(path: Path, *, flag: str, example: str) -> None:
    """Fail before any work, naming the flag, if `path` cannot be written as a file."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory; {flag} takes a file name like {example}")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise InputError(f"{parent}: the output directory does not exist; create it or "
                         f"choose another {flag}")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: the output directory is not writable; choose another "
                         f"{flag}")


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
            atomic_write_json(settings_path, self.settings)

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


def atomic_write_json(path: Path, data: object) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:4])


def assemble(
    genes: Sequence[str],
    records: Mapping[str, GeneIsoforms],
    rows: Mapping[str, torch.Tensor],
    *,
    dim: int,
    meta: dict[str, Any],
    reused: EsmFile | None = None,
) -> dict[str, Any]:
    """Build the contract's dict: rows gene by gene in input order, canonical first.

    A gene with a fresh record takes its rows from `rows`; one without takes them from
    `reused` (an earlier esm_all.pt made with the same settings).
    """
    parts: list[torch.Tensor] = []
    protein_ids: list[str] = []
    index: dict[str, list[int]] = {}
    for gene in genes:
        ids, gene_rows = _gene_rows(gene, records, rows, reused)
        index[gene] = list(range(len(protein_ids), len(protein_ids) + len(ids)))
        protein_ids += ids
        parts += gene_rows
    emb = (torch.stack(parts) if parts else torch.zeros(0, dim)).to(torch.float16)
    return {"emb": emb, "genes": list(genes), "protein_ids": protein_ids,
            "gene_to_isoform_indices": index, "meta": meta}


def _gene_rows(gene: str, records: Mapping[str, GeneIsoforms],
               rows: Mapping[str, torch.Tensor],
               reused: EsmFile | None) -> tuple[list[str], list[torch.Tensor]]:
    record = records.get(gene)
    if record is not None:
        isoforms = record.isoforms
        return ([i.protein_id for i in isoforms],
                [rows[sequence_key(i.sequence)] for i in isoforms])
    if reused is not None and gene in reused.gene_to_isoform_indices:
        old = reused.rows_of(gene)
        return [reused.protein_ids[i] for i in old], [reused.emb[i] for i in old]
    raise StoreError(f"internal: gene {gene!r} has neither a record nor a reused row")


def write_esm_file(path: Path, data: dict[str, Any]) -> EsmFile:
    """Validate, then write atomically: a crash never leaves a half-written esm_all.pt."""
    checked = validate(data, source=str(path))
    atomic_save(data, path)
    return checked
