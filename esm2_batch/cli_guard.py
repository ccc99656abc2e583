"""What every esm2-batch command shares: errors to one line and an exit code, Ctrl-C and
SIGTERM to 130 / 143 after the stage has written what it embedded, and the logging and
output switches (-v, -q, and the input lines shown even with -q).

Apart from cli.py so the commands of cli.py and cli_look.py run under the one guard.
Exit codes: 0 done, 2 bad input or flag, 3 Ensembl, 4 model, 5 embedding, 6 output or
resume state, 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import typer

from esm2_batch.errors import (
    EmbeddingError,
    EnsemblError,
    EnsemblUnavailableError,
    Esm2BatchError,
    InputError,
    ModelError,
    StoreError,
)

__all__ = ["EXIT_CODES", "Terminated", "guarded", "guarded_command", "say", "setup_logging"]

EXIT_CODES: tuple[tuple[type[Esm2BatchError], int], ...] = (
    (InputError, 2), (EnsemblError, 3), (ModelError, 4), (EmbeddingError, 5), (StoreError, 6))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so the same cleanup runs."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def guarded(work: Callable[[], None]) -> None:
    """Run `work`; turn our errors into one line on stderr and an exit code.

    SIGINT and SIGTERM unwind the run like an exception: the embedding stage is stopped
    and waited for, and its writer thread writes every row embedded so far (run/stages.py)
    before the exit, so a rerun embeds only the rest; every fetched gene is already in the
    partial store. A second signal during that wait ends the run at once (written files
    are whole; rows not yet written are embedded again by the rerun).
    The process then ends with os._exit: once torch has run in a worker thread, an
    interrupted run's interpreter teardown can abort in torch's C++ runtime
    ("terminate called without an active exception", exit 134) after the work was
    already saved; nothing is left to flush at that point but the streams, done first.
    """
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        work()
    except Esm2BatchError as exc:
        typer.echo(f"esm2-batch: error: {exc}{hint(exc)}", err=True)
        raise typer.Exit(exit_code(exc)) from None
    except KeyboardInterrupt as exc:
        code, what = (143, "terminated") if isinstance(exc, Terminated) else (130, "interrupted")
        typer.echo(f"esm2-batch: {what}; rerun the same command to resume", err=True)
        exit_now(code)
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_now(code: int) -> None:
    """End the process after an interrupt, streams flushed (see guarded)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_code(exc: Esm2BatchError) -> int:
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), 1)


def hint(exc: Esm2BatchError) -> str:
    if isinstance(exc, EnsemblUnavailableError) and "cannot reach" in str(exc):
        return (". Offline? Pass --isoforms FILE (a FASTA written by --save_isoforms) to "
                "skip Ensembl, or --ensembl_url URL for a reachable mirror")
    return ""


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[
        min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from esm2_batch.sources.gene_lists import INPUTS_LOGGER

    inputs = logging.getLogger(INPUTS_LOGGER)  # what was read from the input: even with -q
    inputs.setLevel(logging.INFO)
    inputs.propagate = False
    if not any(isinstance(h, EchoHandler) for h in inputs.handlers):
        inputs.addHandler(EchoHandler())


class EchoHandler(logging.Handler):
    """A log line as a plain stderr line (typer.echo finds the stream at each call, so
    a test runner's captured stderr gets it too)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def say(line: str, quiet: bool) -> None:
    if not quiet:
        typer.echo(line)


def guarded_command(command: Callable[..., None]) -> Callable[..., None]:
    """A command function of another module, run under `guarded` (typer reads the
    wrapped function's signature through functools.wraps)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        guarded(lambda: command(*args, **kwargs))

    return run
