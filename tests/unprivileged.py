"""Permission tests that run as root too (CI's containers run as root, who writes
anywhere): the permission check is asked as user nobody. The `unprivileged` fixture
(tests/conftest.py) gives a place and this to ask with."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
NOBODY = 65534


class Unprivileged:
    """A place where directory permissions bite, and a way to ask as someone they bite:
    this user or, when the suite runs as root, user nobody, so such a test runs instead of
    being skipped.

    As root, `run` sets only the REAL user and group to nobody for the call: os.access
    (how the package checks that an output is writable) answers for the real ids, while
    imports and everything else keep root's effective ids, in this process (no fork).
    `root` is a directory nobody can reach."""

    def __init__(self, root: Path, *, as_nobody: bool) -> None:
        self.root, self._as_nobody = root, as_nobody

    def run(self, ask: Callable[[], T]) -> T:
        if not self._as_nobody:
            return ask()
        with _real_ids(NOBODY):
            return ask()


@contextmanager
def _real_ids(uid: int) -> Iterator[None]:
    """Real uid and gid `uid` inside the block; effective and saved ids stay root's."""
    os.setresgid(uid, 0, 0)
    os.setresuid(uid, 0, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)
