"""The device check's harness: each section in its own process, under a hard time cap.

A GPU is lent for minutes, once. So one section must never cost the others: each runs in
a child process that the parent kills when it overruns its cap (recorded as
``{"timed_out": true}`` with whatever the section had measured so far), a crash or a
CUDA error in one leaves the rest running, the GPU memory a section held is returned when
its process ends (so every section, and every contender in it, starts from an empty card),
and the JSON report is rewritten after every section (a run cut short keeps what it
measured).

A package that is missing (the lent image has no network: see scripts/device_wheels.sh)
never stops the run either: the import fails inside the section or contender that needs
it, which is then recorded as ``{"skipped": "<why>"}``.

Children are forked where the platform allows and the parent has not touched CUDA (they
inherit the imported modules, so a section starts in milliseconds rather than re-importing
torch); otherwise, or when a forked child cannot initialise CUDA, they are spawned.
This module imports only the standard library and torch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Result = dict[str, Any]
WHEELS_HINT = "carry its wheel (bash scripts/device_wheels.sh; README, Performance)"


def missing_line(exc: ModuleNotFoundError) -> str:
    """The JSON line for a contender or section whose package is absent."""
    return f"module {exc.name or '?'!r} is not installed here: {WHEELS_HINT}"


class Context:
    """What a section sees in its process: the options, the report so far (the GEMM peaks
    the speed sections divide by), the device, and `partial` to save progress."""

    def __init__(self, args: argparse.Namespace, report: Result, result_path: Path) -> None:
        self.args = args
        self.quick: bool = bool(args.quick)
        self.device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
        self.cuda = self.device.type == "cuda"
        self.report = report
        self.result_path = result_path

    def partial(self, result: Result) -> None:
        """Save what the section measured so far: a kill at the cap keeps it."""
        write_json(self.result_path, result)


@dataclass(frozen=True)
class Section:
    """One section: where its result goes in the report (("speed", "650M") ->
    report["speed"]["650M"]), its body, its hard cap in seconds, and the modules it
    imports (imported once in the parent so forked children start warm; the wheel test
    imports them under the image's package list)."""

    path: tuple[str, ...]
    body: Callable[[Context], Result]
    cap_s: float
    modules: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "/".join(self.path)


def write_json(path: Path, value: Any) -> None:
    """Write atomically (temp file + rename): a kill mid-write leaves the last version."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Result:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {"value": value}


def preload(modules: tuple[str, ...]) -> dict[str, str]:
    """Import `modules` in the parent (forked children inherit them); the ones that fail
    are returned with the reason, and fail again, recorded, in the section that needs
    them. Never imports anything that initialises CUDA (the children could not use it)."""
    failed: dict[str, str] = {}
    for name in dict.fromkeys(modules):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            failed[name] = missing_line(exc)
        except Exception as exc:  # recorded; the section reports its own failure
            failed[name] = f"{type(exc).__name__}: {exc}"
    return failed


def start_method() -> str:
    """"fork" when this platform has it and CUDA is untouched in this process, else
    "spawn" (a child forked after CUDA initialised could not use it)."""
    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _child(section: Section, args: argparse.Namespace, report: Result,
           result_path: Path) -> None:
    """The section's process: run the body, write its result; never raise."""
    with contextlib.suppress(OSError):
        os.setpgrp()  # its own process group: the parent's kill takes its helpers too
    if args.quick:  # one thread: on a loaded CI machine two would spin on each other
        torch.set_num_threads(1)
    context = Context(args, report, result_path)
    try:
        result = section.body(context)
    except ModuleNotFoundError as exc:
        result = {"skipped": missing_line(exc)}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    write_json(result_path, {"result": result, "finished": True})
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)  # no interpreter shutdown: a lingering thread must not hold the cap


def run_one(section: Section, *, args: argparse.Namespace, report: Result, cap_s: float,
            method: str, work: Path) -> Result:
    """Run `section` in a child process for at most `cap_s` seconds; its result, or what
    it saved before it was killed or died."""
    result_path = work / f"{section.name.replace('/', '-')}.json"
    with contextlib.suppress(FileNotFoundError):
        result_path.unlink()
    process = multiprocessing.get_context(method).Process(
        target=_child, args=(section, args, report, result_path), daemon=False)
    began = time.perf_counter()
    process.start()
    try:
        process.join(cap_s)
    except BaseException:  # Ctrl-C: the child is in its own group and would run on
        _kill(process)
        raise
    timed_out = process.is_alive() and not read_json(result_path).get("finished")
    if process.is_alive():  # over its cap, or done but stuck on its way out
        _kill(process)
    saved = read_json(result_path)
    if saved.get("finished"):
        result = dict(saved["result"])
    elif timed_out:
        result = dict(saved)  # what it had measured until the kill
        result.update({"timed_out": True, "cap_s": round(cap_s, 1)})
    else:
        result = dict(saved)
        result["error"] = (f"section process ended with exit code {process.exitcode} "
                           "before writing its result")
    result["section_s"] = round(time.perf_counter() - began, 1)
    return result


def _kill(process: multiprocessing.process.BaseProcess) -> None:
    """End the child and its process group (threads die with it; helper processes it
    started in its group too)."""
    pid = process.pid
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    process.kill()
    process.join(10)


class Runner:
    """Runs sections in order into one report, saved to `out` after each."""

    def __init__(self, args: argparse.Namespace, out: Path, *, budget_s: float,
                 method: str | None = None) -> None:
        self.args = args
        self.out = out
        self.budget_s = budget_s
        self.method = method or start_method()
        self.report: Result = {}
        self.start = time.perf_counter()
        self._work = Path(tempfile.mkdtemp(prefix="device-check-"))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        """Remove the sections' scratch files (the report stays)."""
        shutil.rmtree(self._work, ignore_errors=True)

    def save(self) -> None:
        self.report["wall_s"] = round(self.elapsed(), 1)
        write_json(self.out, self.report)

    def put(self, path: tuple[str, ...], value: Result) -> None:
        node = self.report
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def get(self, path: tuple[str, ...]) -> Result:
        node: Any = self.report
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, dict) else {}

    def run(self, section: Section, *, skip: bool = False, cap_s: float | None = None
            ) -> Result:
        """Run (or skip) one section, store its result, save the report."""
        remaining = self.budget_s - self.elapsed()
        if skip:
            result: Result = {"skipped": "--skip"}
        elif remaining < 1.0:
            result = {"skipped": f"time budget of {self.budget_s:.0f} s spent"}
        else:
            cap = min(section.cap_s if cap_s is None else cap_s, remaining)
            result = run_one(section, args=self.args, report=self.report, cap_s=cap,
                             method=self.method, work=self._work)
        self.put(section.path, result)
        self.save()
        return result
