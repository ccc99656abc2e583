"""The one FASTA reader: protein FASTA for FASTA mode, --isoforms and Ensembl's pep files.

Streams (a 30 MB pep.all.fa.gz never has to sit in memory as lines), reads gzip by the
.gz suffix, tolerates a UTF-8 BOM, CRLF, blank lines, ';' comments and wrapped sequences,
and turns every failure to read into one InputError naming the file.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from esm2_batch.errors import InputError, first_line

__all__ = ["iter_fasta", "iter_fasta_headers", "open_text", "read_fasta"]


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(header without '>', sequence) pairs in file order."""
    return list(iter_fasta(path))


def iter_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """(header without '>', sequence) pairs in file order, streamed.

    Raises InputError for a missing or unreadable file and for sequence lines before the
    first header (not a FASTA file).
    """
    path = _existing(path)
    header: str | None = None
    chunks: list[str] = []
    for number, line in enumerate(_lines(path), start=1):
        if line.startswith(">"):
            if header is not None:
                yield header, "".join(chunks)
            header, chunks = line[1:].strip(), []
        elif line.strip() and not line.startswith(";"):
            if header is None:
                raise InputError(f"{path}:{number}: sequence before the first '>' header; "
                                 "is this a FASTA file?")
            chunks.append("".join(line.split()))
    if header is not None:
        yield header, "".join(chunks)


def iter_fasta_headers(path: str | Path) -> Iterator[str]:
    """Header lines only, without '>' (when the sequences are never needed)."""
    for line in _lines(_existing(path)):
        if line.startswith(">"):
            yield line[1:].strip()


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a FASTA file" if path.is_dir() else "no such FASTA file"
        raise InputError(f"{path}: {what}")
    return path


def _lines(path: Path) -> Iterator[str]:
    try:
        with open_text(path) as handle:
            for line in handle:
                yield line.rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the FASTA file ({first_line(exc)}); check the "
                         "file or download it again") from exc


def open_text(path: Path) -> TextIO:
    """A text handle on a plain or gzipped file (by the .gz suffix), BOM removed."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")
