"""The one atomic writer: every file esm2-batch creates is written through here.

One promise for every output (esm_all.pt, its side files, row chunks, *_ESM.pt, exports,
the .h5ad copy, downloads, the isoforms FASTA): a reader sees the old file or the whole
new one, never half of it, and a crash at any instant leaves no half-written file under
a name a reader trusts. How:

- write to a temporary name in the target's own directory (so the rename never crosses
  a filesystem), flush and fsync the data, rename over the target, fsync the directory
  so the rename itself survives a power cut;
- on any failure (an exception, Ctrl-C) remove the temporary file and re-raise;
- a full disk or quota (ENOSPC, EDQUOT) becomes one StoreError line naming the file, the
  space it needed and the space free (disk_errors, also used by the partial store's
  isoform log), instead of a traceback from deep inside torch.save;
- give the file the mode any file the user creates gets: 0666 minus the umask.
  ``tempfile.mkstemp`` creates 0600 files, which would leave results unreadable to the
  lab's group whatever its umask; the mode is set on the open descriptor before the
  rename, so the file never appears under its name with the wrong mode.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from esm2_batch.errors import StoreError, first_line

__all__ = ["atomic_copy", "atomic_json", "atomic_path", "atomic_save", "atomic_text",
           "atomic_write", "check_writable", "disk_errors", "file_mode", "human_bytes"]

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """0666 minus the process umask: the mode open() would give a new file."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The current umask, read without changing it where the OS allows (Linux /proc);
    elsewhere set and restored under a lock."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike[str], needed_bytes: int | None = None
                ) -> Iterator[None]:
    """Turn a full disk or quota (ENOSPC, EDQUOT) inside the block into one StoreError
    line: the user can act on "free space and rerun", not on an OSError from torch.save.

    The one place this translation lives: the atomic writer and the isoform log use it.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise StoreError(_disk_full_message(Path(path), exc.errno, needed_bytes)) from exc


def _disk_full_message(path: Path, code: int, needed_bytes: int | None) -> str:
    """'<path>: no space left on device writing 2.0 MiB (512.0 KiB free); ...'."""
    needed = f" writing {human_bytes(needed_bytes)}" if needed_bytes is not None else ""
    free = _free_bytes(path)
    free_text = f" ({human_bytes(free)} free)" if free is not None else ""
    return (f"{path}: {os.strerror(code).lower()}{needed}{free_text}; free space and rerun "
            "the same command to resume")


def _free_bytes(path: Path) -> int | None:
    """Free space on the filesystem holding `path` (its nearest existing ancestor)."""
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            if folder.exists():
                return shutil.disk_usage(folder).free
    return None


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB': sizes in messages a person reads."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, needed_bytes: int | None = None
                ) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends without error, the file
    written there is fsynced, given the umask's mode and renamed onto `path`.

    For writers that want a file name rather than a handle (h5py, a copy). A full disk
    becomes a StoreError (disk_errors), after the temporary file is removed.
    """
    target = Path(path)
    with disk_errors(target, needed_bytes):
        directory = target.resolve().parent
        fd, name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _finish(tmp, target, directory)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *,
                 needed_bytes: int | None = None) -> None:
    """Call `write(handle)` on a temporary file, then publish it atomically at `path`.

    `needed_bytes` (the size about to be written, where known) goes into a disk-full
    message."""
    with atomic_path(path, needed_bytes=needed_bytes) as tmp, open(tmp, "wb") as handle:
        write(handle)


def atomic_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text atomically."""
    data = text.encode("utf-8")

    def write(handle: BinaryIO) -> None:
        handle.write(data)

    atomic_write(path, write, needed_bytes=len(data))


def atomic_json(path: str | os.PathLike[str], data: object) -> None:
    """Write JSON (sorted keys, indented: diffable) atomically."""
    atomic_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def atomic_save(obj: object, path: str | os.PathLike[str], *,
                needed_bytes: int | None = None) -> None:
    """torch.save, atomically (torch is imported here, not by the module)."""
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle), needed_bytes=needed_bytes)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                edit: Callable[[Path], None] | None = None) -> None:
    """Copy a file or a whole directory to `dst`, let `edit` change the copy, then publish
    it atomically; `src` is never modified. A directory `dst` must not exist yet."""
    source, target = Path(src), Path(dst)
    if source.is_dir():
        _copy_dir(source, target, edit)
        return
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
        if edit is not None:
            edit(tmp)


def _copy_dir(source: Path, target: Path, edit: Callable[[Path], None] | None) -> None:
    staging = Path(tempfile.mkdtemp(dir=target.resolve().parent, prefix=f".{target.name}."))
    try:
        tmp = staging / "copy"
        # copyfile, not copy2: new files get the umask's mode, not the source's; a
        # read-only source (a shared dataset) must still give a copy `edit` can change
        shutil.copytree(source, tmp, copy_function=shutil.copyfile)
        _dir_modes(tmp)  # copytree copies the directories' modes
        if edit is not None:
            edit(tmp)
        _dir_modes(tmp)
        for root, _dirs, files in os.walk(tmp):
            for entry in files:
                _sync_file(Path(root) / entry)
        os.rename(tmp, target)
        _sync_dir(target.resolve().parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dir_modes(top: Path) -> None:
    """Give `top` and every directory below it the mode mkdir would: 0777 minus the umask."""
    mode = 0o777 & ~_umask()
    top.chmod(mode)
    for root, dirs, _files in os.walk(top):
        for entry in dirs:
            (Path(root) / entry).chmod(mode)


def _finish(tmp: Path, target: Path, directory: Path) -> None:
    _sync_file(tmp)
    os.replace(tmp, target)
    _sync_dir(directory)


def _sync_file(path: Path) -> None:
    """fsync the data and set the umask's mode on the descriptor itself."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fchmod(fd, file_mode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it is durable (a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(path: Path, *, flag: str, example: str) -> None:
    """Fail before any work, naming the flag, if `path` cannot be written as a file
    (a StoreError: exit 6, like every output problem)."""
    parent = path.absolute().parent
    try:  # a directory on the way that cannot be entered raises here, not ENOENT
        if path.is_dir():
            raise StoreError(f"{path}: is a directory; {flag} takes a file name like "
                             f"{example}")
        parent = path.resolve().parent
        exists = parent.is_dir()
    except OSError as exc:
        raise StoreError(f"{parent}: the output directory cannot be entered "
                         f"({first_line(exc)}); choose another {flag}") from None
    if not exists:
        raise StoreError(f"{parent}: the output directory does not exist; create it or "
                         f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):  # creating a file needs both
        raise StoreError(f"{parent}: the output directory is not writable; choose another "
                         f"{flag}")
