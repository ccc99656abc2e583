"""The resumable partial store: the work of an unfinished run, in `<out>.partial/`.

Everything here keeps one promise: a crash at any instant loses nothing that was
finished, and never leaves a half-written file under a name that a reader trusts (every
file goes through store.atomic, the isoform log is appended and fsynced line by line).

Three more promises, because these directories live for days on shared disks:

- one run at a time: a run holds an exclusive flock on `lock` (the kernel drops it when
  the process dies, so even kill -9 leaves no stale lock); a second run on the same
  --out fails at once, naming the first one's pid;
- damage is named and dropped, never a traceback: an unreadable rows chunk or isoform
  line is warned about and removed (its rows are embedded again, its gene fetched
  again); an unreadable settings.json means nothing proves what the rows were made with,
  so the store starts clean; overwrite=True always starts clean;
- a full disk is one StoreError line (store.atomic.disk_errors), and nothing finished
  is lost: the rerun resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch

from esm2_batch.errors import StoreError, first_line, name_some
from esm2_batch.records import GeneIsoforms
from esm2_batch.store.atomic import atomic_json, atomic_save, atomic_write, disk_errors

SETTINGS_FILE = "settings.json"
PROVENANCE_FILE = "provenance.json"
ISOFORMS_FILE = "isoforms.jsonl"
ROWS_DIR = "rows"
LOCK_FILE = "lock"

log = logging.getLogger("esm2_batch")


class PartialStore:
    """The work of an unfinished run, in `<out>.partial/`.

    lock            flocked by the run that holds the store; holds its pid and host
    settings.json   what the rows depend on (model, layer, pooling, truncation, ...);
                    a rerun with other settings is refused unless overwrite=True
    isoforms.jsonl  one fetched GeneIsoforms per line, appended and fsynced as it comes
                    (from local files in batches: GeneLog)
    rows/NNNNNN.pt  {"keys": [store.keys.RowKeys keys], "emb": float16 [k, width]}, one
                    per flush, each written to a temporary name and renamed; width is
                    dim, or with several layers/poolers (settings["matrices"], n names)
                    n * dim: each row's matrices side by side in that order, so a chunk
                    holds every matrix of its rows or, unfinished, none

    Use it as a context manager (or call close()) so the lock is released on every exit
    path; remove() deletes the directory and then releases it.
    """

    def __init__(self, directory: Path, settings: dict[str, Any], *,
                 overwrite: bool = False) -> None:
        self.directory = directory
        self.settings = settings
        self._lock = DirectoryLock.acquire(directory, overwrite=overwrite)
        try:
            self._prepare(overwrite)
        except BaseException:
            self.close()
            raise
        self._next_chunk = self._next_chunk_number()

    def __enter__(self) -> PartialStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        """A store dropped without close() (a caller's bug) still frees its lock."""
        self.close()

    def close(self) -> None:
        """Release the lock (idempotent); the files stay for the next run to resume."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def remove(self) -> None:
        """Delete the directory, then release the lock: while it is being deleted, no
        other run can start on half of it."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.close()

    # -- opening -------------------------------------------------------------------------
    def _prepare(self, overwrite: bool) -> None:
        if overwrite:
            self._clear()
        else:
            self._check_settings()
        self._drop_debris()
        self._ensure_rows_dir()
        settings_path = self.directory / SETTINGS_FILE
        if not settings_path.is_file():
            atomic_json(settings_path, self.settings)

    def _check_settings(self) -> None:
        """Refuse other settings; start clean when nothing proves what the rows were
        made with (settings.json damaged, or missing beside earlier work)."""
        old = self._read_settings()
        if old is None:
            return
        if old != self.settings:
            raise StoreError(
                f"{self.directory}: holds an unfinished run with other settings "
                f"({describe_difference(old, self.settings)}); rerun with the same "
                "settings to resume, or pass --overwrite to start again")

    def _read_settings(self) -> dict[str, Any] | None:
        """The recorded settings, or None after starting clean (missing or damaged)."""
        path = self.directory / SETTINGS_FILE
        if not path.exists() and not path.is_symlink():
            if self._has_work():
                self._start_clean(path, "missing")
            return None
        try:
            old = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or bad JSON
            self._start_clean(path, f"unreadable: {first_line(exc)}")
            return None
        if not isinstance(old, dict):
            self._start_clean(path, f"holds a JSON {type(old).__name__}, not settings")
            return None
        return old

    def _start_clean(self, path: Path, reason: str) -> None:
        log.warning("%s: %s; nothing proves what the unfinished run's rows were made with, "
                    "so it starts again from scratch", path, reason)
        self._clear()

    def _has_work(self) -> bool:
        """Whether anything but the lock and an empty rows/ is here."""
        rows = self.directory / ROWS_DIR
        return any(entry.name != LOCK_FILE and not (entry == rows and _empty_dir(rows))
                   for entry in self.directory.iterdir())

    def _clear(self) -> None:
        """Remove everything but the lock, whatever it is (garbage files, a rows file)."""
        for entry in self.directory.iterdir():
            if entry.name != LOCK_FILE:
                _delete(entry, self.directory)

    def _drop_debris(self) -> None:
        """Temporary files of a killed writer: nobody else writes here (we hold the lock)."""
        for folder in (self.directory, self.directory / ROWS_DIR):
            if folder.is_dir() and not folder.is_symlink():
                for tmp in folder.glob(".*.tmp"):
                    _delete(tmp, self.directory)

    def _ensure_rows_dir(self) -> None:
        rows = self.directory / ROWS_DIR
        if (rows.exists() or rows.is_symlink()) and (rows.is_symlink() or not rows.is_dir()):
            log.warning("%s: not a directory; removed, its rows will be embedded again", rows)
            _delete(rows, self.directory)
        with disk_errors(rows):
            rows.mkdir(exist_ok=True)

    # -- provenance ------------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        """Facts earlier attempts recorded (the Ensembl release their genes came from, the
        engines their rows were computed with), so a resumed run's meta keeps them."""
        path = self.directory / PROVENANCE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def record_provenance(self, **facts: Any) -> None:
        """Merge facts into provenance.json (list values are unions, in first-seen order)."""
        merged = self.provenance()
        for key, value in facts.items():
            if isinstance(value, list):
                known = merged.get(key)
                earlier: list[Any] = known if isinstance(known, list) else []
                value = list(dict.fromkeys([*earlier, *value]))
            if value is not None:
                merged[key] = value
        atomic_json(self.directory / PROVENANCE_FILE, merged)

    # -- fetched isoforms ----------------------------------------------------------------
    def cached_genes(self) -> dict[str, GeneIsoforms]:
        """Genes fetched by earlier attempts; a torn last line (a crash) is cut off, a
        damaged line elsewhere is named and dropped (its gene is fetched again)."""
        path = self.directory / ISOFORMS_FILE
        if not path.is_file():
            return {}
        raw = path.read_bytes()
        good_end = raw.rfind(b"\n") + 1
        if good_end < len(raw):
            with open(path, "r+b") as handle:
                handle.truncate(good_end)
        lines = [line for line in raw[:good_end].split(b"\n") if line.strip()]
        parsed = [(line, _parse_gene(line)) for line in lines]
        bad = [str(n) for n, (_, gene) in enumerate(parsed, 1) if gene is None]
        if bad:
            self._drop_lines(path, bad, [line for line, gene in parsed if gene is not None])
        return {gene.query: gene for _, gene in parsed if gene is not None}

    def _drop_lines(self, path: Path, bad: list[str], good: list[bytes]) -> None:
        """Rewrite the log without its damaged lines, so the warning comes once."""
        log.warning("%s: %d damaged line(s) dropped (line %s); their genes will be fetched "
                    "again", path, len(bad), name_some(bad, 8))
        data = b"".join(line + b"\n" for line in good)

        def write(handle: BinaryIO) -> None:
            handle.write(data)

        atomic_write(path, write, needed_bytes=len(data))

    def append_genes(self, genes: Iterable[GeneIsoforms]) -> None:
        """Append and fsync: a gene written here is never fetched again."""
        data = "".join(json.dumps(g.to_dict()) + "\n" for g in genes).encode("utf-8")
        if not data:
            return
        path = self.directory / ISOFORMS_FILE
        with disk_errors(path, len(data)):
            _append_durably(path, data)

    # -- embedded rows -------------------------------------------------------------------
    def _chunk_files(self) -> list[Path]:
        chunks = (self.directory / ROWS_DIR).glob("[0-9]*.pt")
        return sorted(path for path in chunks if path.stem.isdigit())

    def _next_chunk_number(self) -> int:
        """One past the highest number: a removed damaged chunk leaves a gap, and
        counting files would then overwrite a good chunk."""
        return max((int(path.stem) for path in self._chunk_files()), default=-1) + 1

    def add_rows(self, keys: list[str], emb: torch.Tensor) -> None:
        """Persist rows (stored float16, as in the final file) under the next chunk name."""
        if not keys:
            return
        rows = emb.detach().to("cpu", torch.float16).contiguous()
        chunk = {"keys": list(keys), "emb": rows}
        size = rows.nbytes + sum(len(key) for key in keys)
        atomic_save(chunk, self.directory / ROWS_DIR / f"{self._next_chunk:06d}.pt",
                    needed_bytes=size)
        self._next_chunk += 1

    def load_rows(self) -> dict[str, torch.Tensor]:
        """Every row embedded so far, by sequence key; damaged chunks are dropped.

        Holds every chunk at once: assembling a large file reads `row_chunks` instead."""
        rows: dict[str, torch.Tensor] = {}
        for keys, emb in self.row_chunks():
            rows.update(zip(keys, emb, strict=True))
        return rows

    def row_chunks(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(keys, rows) of one chunk at a time, in write order (a later chunk's row wins,
        as in load_rows); damaged chunks are dropped. Only the chunk being read is in
        memory, so a whole proteome's rows never sit here beside the assembled file."""
        for path in self._chunk_files():
            chunk = self._read_chunk(path)
            if chunk is not None:
                yield chunk

    def _read_chunk(self, path: Path) -> tuple[list[str], torch.Tensor] | None:
        """One chunk's keys and rows, or None when it is damaged (removed: embedded
        again)."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return _chunk_parts(data, row_width(self.settings))
        except Exception as exc:  # a damaged file makes torch raise any of many types
            log.warning("%s: damaged rows chunk (%s); removed, its rows will be embedded "
                        "again", path, first_line(exc))
            _delete(path, self.directory)
            return None

    def embedded_keys(self) -> set[str]:
        """The keys of every stored row, reading one chunk at a time."""
        return {key for keys, _ in self.row_chunks() for key in keys}


class GeneLog:
    """Fetched genes on their way to isoforms.jsonl, appended in batches.

    A REST gene costs a rate-limited request, so each is fsynced as it comes
    (`batch=1`). A local source (Ensembl files, an isoforms FASTA) yields thousands of
    genes a second, and one fsync each would make a whole-proteome run wait on the disk
    (on a network file system, minutes for 20,000 genes); there a batch is appended and
    fsynced every `batch` genes or `seconds`, whichever comes first, and at `flush()`.
    The promise is unchanged: a gene counts as recorded only once fsynced; one still in
    the buffer at a kill -9 is simply read from the local files again on the rerun.
    """

    def __init__(self, store: PartialStore, *, batch: int = 1, seconds: float = 2.0) -> None:
        self.store, self.batch, self.seconds = store, max(1, batch), seconds
        self._pending: list[GeneIsoforms] = []
        self._since = time.monotonic()

    def add(self, gene: GeneIsoforms) -> None:
        self._pending.append(gene)
        if (len(self._pending) >= self.batch
                or time.monotonic() - self._since >= self.seconds):
            self.flush()

    def flush(self) -> None:
        """Append and fsync what is buffered (one write, one fsync)."""
        pending, self._pending = self._pending, []
        self._since = time.monotonic()
        self.store.append_genes(pending)


class DirectoryLock:
    """An exclusive, non-blocking flock on `<directory>/lock`.

    flock, not a pid file: the kernel releases it when the holder's process dies, so a
    crash or kill -9 never leaves a lock behind that a user must delete by hand.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path, *, overwrite: bool) -> DirectoryLock:
        """Lock `directory` (created if missing) or raise a StoreError naming the holder."""
        _make_directory(directory, overwrite=overwrite)
        path = directory / LOCK_FILE
        for _ in range(10):  # retried only if a finishing run deleted the file we locked
            fd = _lock_file(path)
            if fd is not None:
                _record_holder(fd)
                return cls(fd)
        raise StoreError(f"{directory}: could not be locked (it keeps being removed); "
                         "wait for the other run to finish, then rerun")

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock


def _make_directory(directory: Path, *, overwrite: bool) -> None:
    if (directory.exists() or directory.is_symlink()) and not directory.is_dir():
        if not overwrite:
            raise StoreError(f"{directory}: is a file, not an unfinished run's directory; "
                             "move it away or pass --overwrite to replace it")
        directory.unlink()
    with disk_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)


def _lock_file(path: Path) -> int | None:
    """The flocked descriptor, None if the file was unlinked meanwhile, or StoreError."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        _delete(path, path.parent)  # not a file this package made: nobody can hold it
    with disk_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        os.close(fd)
        raise StoreError(_busy_message(path.parent, holder)) from None
    if _still_linked(fd, path):
        return fd
    os.close(fd)
    return None


def _busy_message(directory: Path, holder: list[str]) -> str:
    pid = holder[0] if holder else "unknown"
    if pid == str(os.getpid()) and holder[1:2] == [socket.gethostname()]:
        return (f"{directory}: already open in this process (pid {pid}); close() the "
                "earlier PartialStore (or use it in a with block) before opening it again")
    host = f" on {holder[1]}" if len(holder) > 1 and holder[1] != socket.gethostname() else ""
    return (f"{directory}: in use by another esm2-batch run (pid {pid}{host}) on the same "
            "--out; wait for it or stop it, then rerun (or choose another --out)")


def _still_linked(fd: int, path: Path) -> bool:
    """Whether the locked descriptor is still the file at `path` (a finishing run
    removes the directory; a lock on the removed file would guard nothing)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _record_holder(fd: int) -> None:
    """Write 'pid host' so a refused run can say who holds the lock (informational:
    a full disk here does not stop the run)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def _append_durably(path: Path, data: bytes) -> None:
    """Append `data` and fsync it; on any failure cut the file back to where it was, so
    a full disk leaves no torn line behind."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _parse_gene(line: bytes) -> GeneIsoforms | None:
    """One isoform-log line, or None when it is damaged: bad UTF-8, bad JSON, or JSON
    that is not a GeneIsoforms record."""
    try:
        data = json.loads(line.decode("utf-8"))
        return GeneIsoforms.from_dict(data) if isinstance(data, dict) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _chunk_parts(data: object, dim: object) -> tuple[list[str], torch.Tensor]:
    """(keys, emb) of a loaded chunk, or ValueError saying what is wrong with it."""
    if not isinstance(data, dict) or not {"keys", "emb"} <= set(data):
        raise ValueError("no keys and emb")
    keys, emb = data["keys"], data["emb"]
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ValueError("keys are not a list of strings")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(keys):
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"emb {shape} does not hold {len(keys)} rows")
    if isinstance(dim, int) and emb.shape[1] != dim:
        raise ValueError(f"rows of width {emb.shape[1]}, not {dim}")
    return keys, emb


def row_width(settings: dict[str, Any]) -> object:
    """The width of a stored row: embed_dim times the number of matrices (one when the
    settings list none); what the settings do not state is not checked (None)."""
    dim, matrices = settings.get("embed_dim"), settings.get("matrices")
    if isinstance(dim, int) and isinstance(matrices, list):
        return dim * len(matrices)
    return dim


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _delete(entry: Path, directory: Path) -> None:
    """Remove a file, link or folder; a failure is one StoreError line, not a traceback."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    except OSError as exc:
        raise StoreError(f"{entry}: cannot be removed ({exc.strerror or exc}); remove "
                         f"{directory} by hand and rerun") from exc


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:4])
