"""The one exception hierarchy of esm2-batch.

The library raises; only the CLI turns these into one-line messages and exit codes::

    Esm2BatchError                  base: catch this to catch everything we raise
    ├── InputError                  exit 2: a gene list, FASTA, sequence letter, option or
    │                               output path the user can fix
    ├── EnsemblError                exit 3: the Ensembl stage failed (carries .queries)
    │   ├── EnsemblRequestError     HTTP 400: the server refused the request; never retried
    │   ├── EnsemblUnavailableError retries exhausted: 5xx, 429 storms, timeouts, resets,
    │   │                           non-JSON bodies, or the server cannot be reached
    │   └── EnsemblResponseError    a reply that parses but breaks the API's contract
    ├── ModelError                  exit 4: a model cannot be found, downloaded or loaded,
    │                               or the device it needs is absent (also on a Ray cluster)
    ├── EmbeddingError              exit 5: a sequence cannot be embedded (non-finite row,
    │                               out of memory alone); carries .name
    └── StoreError                  exit 6: an existing output or partial directory cannot
                                    be used (unreadable, made with other settings)

A ValueError from a record or a planner's own checks means code inside the package (or a
caller of an internal function) broke an invariant; it is a bug, never user input.
"""
from __future__ import annotations

from collections.abc import Iterable


class Esm2BatchError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(Esm2BatchError, ValueError):
    """Bad user input: the message names the input and what to do about it."""


class EnsemblError(Esm2BatchError):
    """The Ensembl stage failed; `queries` names the genes it affected."""

    def __init__(self, message: str, *, queries: Iterable[str] = ()) -> None:
        self.queries: tuple[str, ...] = tuple(queries)
        shown = f" (genes: {name_some(self.queries, 8)})" if self.queries else ""
        super().__init__(message + shown)


class EnsemblRequestError(EnsemblError):
    """HTTP 400 from Ensembl, with the server's own {"error": ...} text."""


class EnsemblUnavailableError(EnsemblError):
    """Ensembl did not answer usefully within the retry budget."""


class EnsemblResponseError(EnsemblError):
    """Ensembl answered with JSON of the wrong shape."""


class ModelError(Esm2BatchError):
    """A model cannot be resolved, downloaded or loaded."""


class EmbeddingError(Esm2BatchError):
    """One sequence cannot be embedded; `name` says which."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        self.name = name
        super().__init__(message)


class StoreError(Esm2BatchError):
    """The output file or the partial directory cannot be used as asked."""


def name_some(names: Iterable[str], limit: int = 5) -> str:
    """'A, B, C and 7 more': enough names to act on, and the message stays one line.

    The one way every message of the package names "some of these"."""
    shown = list(names)
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type when it has none), so
    a wrapped third-party error stays one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
