"""The wheels carried to the lent GPU machine are complete and pinned.

The machine's image has no network and lacks some of what esm2_batch imports; the list
scripts/device_wheels.sh downloads (scripts/device_wheels.txt) must name all of it. The
proof imports esm2_batch (every module), scripts/device_check.py and every module its
sections import, in a fresh interpreter whose import hook refuses any package outside
the standard library, this repository, the image's package list
(scripts/device_image_packages.txt) and the wheels (tests/scripts/image_gate.py). A
control run without the wheels shows the hook bites, and that device_check itself still
starts there (it skips what needs a missing package instead of dying)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from typing import Any

import pytest

from tests.scripts.image_gate import IMAGE_LIST, ROOT, WHEELS_LIST, listed, pins


def gate(*flags: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "image_gate.py"),
                           *flags], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_wheels_are_pinned_to_the_development_venv() -> None:
    carried = pins()
    assert {"fair-esm", "aiolimiter"} <= set(carried)
    for name, pinned in carried.items():
        assert version(name) == pinned, (name, pinned)


def test_carried_wheels_are_not_in_the_image_and_the_image_has_the_rest() -> None:
    image = set(listed(IMAGE_LIST))
    assert not image & set(pins())  # carry one only for another version: none is
    assert {"torch", "numpy", "aiohttp", "typer", "tqdm", "safetensors",
            "transformers"} <= image


def test_the_wheel_script_follows_the_device_recipe() -> None:
    script = (ROOT / "scripts" / "device_wheels.sh").read_text()
    for part in ("--no-deps", "--only-binary=:all:", "--implementation cp",
                 "manylinux2014_x86_64", f"-r {WHEELS_LIST.relative_to(ROOT)}",
                 "WHEELS_PYTHON:-3.12"):
        assert part in script, part
    assert ".whl/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.slow
def test_esm2_batch_and_device_check_import_with_only_the_image_and_the_wheels() -> None:
    report = gate()
    assert report["failed"] == {}
    assert {"esm", "aiolimiter", "esm2_batch", "device_check", "bench_pipeline",
            "tests"} <= set(report["imported"])
    ours = [r for r in report["refused"] if r["imported_by"] in ("esm2_batch", "tests")]
    assert ours == []


@pytest.mark.slow
def test_without_the_wheels_the_gate_refuses_them_and_device_check_still_starts() -> None:
    report = gate("--without_wheels")
    failed = report["failed"]
    assert "'esm'" in failed["esm2_batch.models"]
    assert "'aiolimiter'" in failed["esm2_batch.sources.ensembl_rest"]
    assert "device_check" not in failed
