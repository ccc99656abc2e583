"""The installed package's version, from its metadata (one source of truth: pyproject)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version


@cache
def package_version() -> str:
    """The version pip installed, or "unknown" when run from a tree that was never
    installed (then no metadata exists to ask)."""
    try:
        return version("esm2-batch")
    except PackageNotFoundError:
        return "unknown"
