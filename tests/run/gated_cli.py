"""The esm2-batch CLI with its embedder watched and held, for the interrupt tests.

    python -m tests.run.gated_cli LOG [--hold N] -- <esm2-batch args>

Runs the real CLI (esm2_batch.cli:app) in this process, with seams and nothing else:

- the stages' `embed_rows` is wrapped: every sequence it is asked to embed is appended
  to LOG as `asked <name>`, and every row the stage has taken as `row <name>` (written
  and flushed at once, so a test reads the truth after the process has ended however);
- `--hold N`: once the stage has taken N rows, `held N` is logged and the embedder waits,
  as if inside a long forward pass, until the process gets SIGINT or SIGTERM; then it
  goes on as before. So a test interrupts at a known point, after the embedder has
  produced rows and before they could reach a 256-row flush: an event, not a sleep.

The CLI's own signal handling (cli_guard.guarded) is unchanged: the wrappers only note that a
signal came, then do what the CLI's handlers do.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

SIGNALLED = threading.Event()


def _note(handle: IO[str], line: str) -> None:
    handle.write(line + "\n")
    handle.flush()


def _watch_embedder(handle: IO[str], hold: int) -> None:
    from esm2_batch.embedding.embed import Embedded
    from esm2_batch.run import stages

    original = stages.embed_rows
    taken = 0

    def gated(model: Any, sequences: Sequence[Any], options: Any) -> Iterator[Embedded]:
        nonlocal taken
        for item in sequences:
            _note(handle, f"asked {item[0] if isinstance(item, tuple) else item}")
        for result in original(model, sequences, options):
            yield result  # returns once the stage has taken it and asks for the next
            taken += 1
            _note(handle, f"row {result.name}")
            if taken == hold:
                _note(handle, f"held {taken}")
                SIGNALLED.wait()

    stages.embed_rows = gated  # type: ignore[assignment]


def _note_signals() -> None:
    from esm2_batch import cli_guard

    def interrupted(signum: int, frame: object) -> None:
        SIGNALLED.set()
        raise KeyboardInterrupt

    terminated = cli_guard.raise_terminated

    def on_term(signum: int, frame: object) -> None:
        SIGNALLED.set()
        terminated(signum, frame)

    signal.signal(signal.SIGINT, interrupted)
    cli_guard.raise_terminated = on_term  # type: ignore[assignment]  # guarded() installs it


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.run.gated_cli")
    parser.add_argument("log", type=Path)
    parser.add_argument("--hold", type=int, default=0)
    split = argv.index("--") if "--" in argv else len(argv)
    options, args = parser.parse_args(argv[:split]), argv[split + 1:]
    handle = open(options.log, "a", encoding="utf-8")  # noqa: SIM115 (open until exit)
    _watch_embedder(handle, options.hold)
    _note_signals()
    from esm2_batch.cli import app

    app(args=args, prog_name="esm2-batch")


if __name__ == "__main__":
    main(sys.argv[1:])
