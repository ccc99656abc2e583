"""FASTA in and out: plain protein FASTA (FASTA mode) and the isoform FASTA that
--save_isoforms writes and --isoforms reads, so a run can skip Ensembl entirely.

Isoform headers carry everything a GeneIsoforms needs::

    >ENSP00000493543 gene=BRAF gene_id=ENSG00000157764 transcript=ENST00000646891
        canonical=1 biotype=protein_coding          (one line in the file)

A gene is the `gene=` value (the query as the user wrote it); its isoforms are re-sorted
canonical first, so a hand-edited file still gives the contract's order.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from esm2_batch.errors import InputError
from esm2_batch.records import GeneIsoforms, Isoform, isoform_sort_key


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(header without '>', sequence) pairs in file order; .gz files are read too."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such FASTA file")
    records: list[tuple[str, str]] = []
    header: str | None = None
    chunks: list[str] = []
    for number, line in enumerate(_lines(path), start=1):
        if line.startswith(">"):
            if header is not None:
                records.append((header, "".join(chunks)))
            header, chunks = line[1:].strip(), []
        elif line.strip() and not line.startswith(";"):
            if header is None:
                raise InputError(f"{path}:{number}: sequence before the first '>' header; "
                                 "is this a FASTA file?")
            chunks.append("".join(line.split()))
    if header is not None:
        records.append((header, "".join(chunks)))
    return records


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            for line in handle:
                yield line.rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the FASTA file ({exc})") from exc


def format_header(iso: Isoform, query: str) -> str:
    return (f"{iso.protein_id} gene={query} gene_id={iso.gene_id} "
            f"transcript={iso.transcript_id} canonical={int(iso.is_canonical)} "
            f"biotype={iso.biotype}")


def write_isoforms_fasta(path: str | Path, genes: Iterable[GeneIsoforms]) -> int:
    """Write every isoform of every gene (atomically); returns the number written."""
    path = Path(path)
    lines: list[str] = []
    for gene in genes:
        for iso in gene.isoforms:
            lines += [">" + format_header(iso, gene.query), *_wrap(iso.sequence)]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return sum(1 for line in lines if line.startswith(">"))


def _wrap(sequence: str, width: int = 60) -> list[str]:
    return [sequence[i:i + width] for i in range(0, len(sequence), width)] or [""]


def read_isoforms_fasta(path: str | Path) -> list[GeneIsoforms]:
    """Group an isoform FASTA by gene, in order of first appearance, canonical first."""
    by_gene: dict[str, list[Isoform]] = {}
    for header, sequence in read_fasta(path):
        protein_id, fields = _parse_header(header, path)
        query = fields["gene"]
        by_gene.setdefault(query, []).append(Isoform(
            protein_id=protein_id, transcript_id=fields.get("transcript", ""),
            gene_id=fields.get("gene_id", query), sequence=sequence.upper().rstrip("*"),
            is_canonical=fields.get("canonical", "0") in ("1", "true", "True"),
            biotype=fields.get("biotype", "protein_coding")))
    return [GeneIsoforms(q, isos[0].gene_id, None, tuple(sorted(isos, key=isoform_sort_key)),
                         "ok") for q, isos in by_gene.items()]


def _parse_header(header: str, path: str | Path) -> tuple[str, dict[str, str]]:
    protein_id, *rest = header.split()
    fields = dict(item.split("=", 1) for item in rest if "=" in item)
    if "gene" not in fields:
        raise InputError(f"{path}: header {header[:60]!r} has no gene=...; --isoforms "
                         "expects headers as --save_isoforms writes them")
    return protein_id, fields


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
