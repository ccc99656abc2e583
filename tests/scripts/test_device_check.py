"""scripts/device_check.py --quick on CPU: every section runs (or says why it cannot) and
the JSON has the figures the GPU run is read for, so the check is ready when a GPU is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_check_quick_runs_every_section_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--quick",
         "--skip", "ray", "--out", str(out)],  # Ray start-up alone takes ~15 s here
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    assert report["quick"] is True and report["device"] == "cpu"
    for label in ("fast_fp16", "fast_bf16", "reference_fp16"):
        figures = report["parity"][label]
        assert figures["finite"] and figures["min_cosine"] > 0.99, label
    for size in ("650M", "3B"):
        speed = report["speed"][size]
        for label in ("fairesm_fp32", "fast"):
            assert {"tokens_per_s", "padding_fraction", "mfu", "tflop_per_s"} <= set(speed[label])
        assert speed["peak_matmul_tflop_per_s"] > 0 and "speedup_fast_vs_fairesm_fp32" in speed
    assert "needs CUDA" in report["oom"]["skipped"]
    e2e = report["end_to_end"]
    assert e2e["genes"] == 20 and e2e["isoforms"] > 0 and e2e["overlap_ratio"] > 0
    assert report["ray"] == {"skipped": "--skip"}
    assert "machine" in report and report["wall_s"] > 0
