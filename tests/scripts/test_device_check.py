"""scripts/device_check.py: --quick on CPU runs every section (or says why it cannot) and the
JSON has every figure and pass/fail field the GPU run is read for; the harness kills a
section at its cap and goes on, saves the JSON after each section, and a missing package
skips the contender or section that needs it with a line instead of stopping the run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:  # the scripts import each other by name, as when run
    sys.path.insert(0, str(SCRIPTS))

from device_measure import Positions, classify_attention, first_layer  # noqa: E402
from device_runner import Context, Result, Runner, Section, read_json  # noqa: E402
from device_sections import build_transformers, contender, gemm, spec_of  # noqa: E402

OURS = ("fast",)  # engines every build has (a new one shows up as one more entry)


# --------------------------------------------------------------------------------------
# The whole check, quick
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_device_check_quick_runs_every_section_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "device_check.py"), "--quick", "--skip", "ray",
         "--out", str(out)],  # Ray start-up alone takes ~15 s here
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    assert report["quick"] is True and report["device"] == "cpu"
    assert report["status"] == {
        "machine": "ok", "gemm": "ok", "speed/650M": "ok", "parity/650M": "ok",
        "speed/3B": "ok", "parity/3B": "ok", "end_to_end": "ok", "oom": "skipped",
        "ray": "skipped"}
    assert report["machine"]["packages"]["fair-esm"] != "not installed"
    for dtype in ("fp16", "bf16", "fp32"):
        assert report["gemm"][dtype]["median_tflop_per_s"] > 0
        assert len(report["gemm"][dtype]["times_ms"]) == report["gemm"][dtype]["reps"]
    for size in ("650M", "3B"):
        speed = report["speed"][size]
        for label in (*OURS, "transformers_sdpa", "fairesm_fp32"):
            figures = speed[label]
            assert {"tokens_per_s", "padding_fraction", "mfu", "tflop_per_s",
                    "positions_computed", "sdpa_backend"} <= set(figures), label
            assert figures["positions_computed"] >= speed["real_tokens"]
        assert speed["fairesm_fp32"]["sdpa_backend"][0].startswith("none")
        assert speed["fast"]["sdpa_backend"] != speed["fairesm_fp32"]["sdpa_backend"]
        auto = speed["fast_auto"]  # toks_per_batch "auto" where the build has it
        assert "tokens_per_s" in auto or "not available in this build" in auto["skipped"]
        assert set(speed["speedup_of_fast"]) >= {"transformers_sdpa", "fairesm_fp32"}
        parity = report["parity"][size]
        assert parity["pass"] is True
        for engine in (*OURS, "reference"):
            for dtype in ("fp16", "bf16"):
                figures = parity[f"{engine}_{dtype}"]
                assert figures["pass"] is True and figures["finite"]
                assert 0 < figures["max_abs_diff"] <= figures["limit"]
        assert parity["fast_bf16"]["limit"] > parity["fast_fp16"]["limit"]  # from dtype
    assert "needs CUDA" in report["oom"]["skipped"]
    e2e = report["end_to_end"]
    assert e2e["genes"] == 20 and e2e["isoforms"] > 0 and e2e["row_cache"] == "off"
    assert report["ray"] == {"skipped": "--skip"}
    assert report["goals"] == {"skipped": "goals are read on CUDA at the published sizes"}
    assert report["wall_s"] > 0


# --------------------------------------------------------------------------------------
# The harness: caps, saving after each section, failures recorded
# --------------------------------------------------------------------------------------


def blocks(ctx: Context) -> Result:
    threading.Event().wait()  # never set: only the cap ends this section
    return {}


def reads_report(ctx: Context) -> Result:
    return {"saved_before_me": read_json(ctx.args.out)}


def dies_after_saving(ctx: Context) -> Result:
    ctx.partial({"measured": 1})
    os._exit(3)


def needs_a_missing_package(ctx: Context) -> Result:
    import not_a_package_on_the_image  # type: ignore[import-not-found]  # noqa: F401

    return {}


def fails(ctx: Context) -> Result:
    raise RuntimeError("boom")


def runner(tmp_path: Path, budget_s: float = 600.0) -> Runner:
    out = tmp_path / "report.json"
    args = argparse.Namespace(quick=True, device="cpu", out=out, seed=0)
    return Runner(args, out, budget_s=budget_s)


def test_a_section_over_its_cap_is_killed_and_the_rest_goes_on(tmp_path: Path) -> None:
    run = runner(tmp_path)
    stuck = run.run(Section(("stuck",), blocks, cap_s=1.0))
    assert stuck["timed_out"] is True and stuck["cap_s"] == 1.0
    after = run.run(Section(("after",), reads_report, cap_s=60.0))
    assert after["saved_before_me"]["stuck"]["timed_out"] is True  # saved after each
    assert read_json(tmp_path / "report.json")["after"] == after


def test_what_a_dying_section_saved_is_kept_and_failures_are_recorded(tmp_path: Path
                                                                      ) -> None:
    run = runner(tmp_path)
    died = run.run(Section(("speed", "650M"), dies_after_saving, cap_s=60.0))
    assert died["measured"] == 1 and "exit code 3" in died["error"]
    missing = run.run(Section(("speed", "3B"), needs_a_missing_package, cap_s=60.0))
    assert "'not_a_package_on_the_image' is not installed" in missing["skipped"]
    assert "device_wheels.sh" in missing["skipped"]
    failed = run.run(Section(("oom",), fails, cap_s=60.0))
    assert failed["error"] == "RuntimeError: boom" and "traceback" in failed
    saved = read_json(tmp_path / "report.json")
    assert set(saved["speed"]) == {"650M", "3B"} and "oom" in saved


@pytest.mark.slow
def test_sections_also_run_in_spawned_processes(tmp_path: Path) -> None:
    """The fallback where a forked child cannot use CUDA: a fresh interpreter per section."""
    run = runner(tmp_path)
    run.method = "spawn"
    result = run.run(Section(("gemm",), gemm, cap_s=300.0))
    assert result["fp16"]["median_tflop_per_s"] > 0 and result["fp32"]["reps"] == 3


def test_sections_past_the_budget_are_skipped(tmp_path: Path) -> None:
    run = runner(tmp_path, budget_s=0.0)
    assert "time budget" in run.run(Section(("gemm",), fails, cap_s=60.0))["skipped"]


# --------------------------------------------------------------------------------------
# Contenders and measures
# --------------------------------------------------------------------------------------


def context(tmp_path: Path) -> Context:
    args = argparse.Namespace(quick=True, device="cpu", out=tmp_path / "r.json", seed=0)
    return Context(args, {}, tmp_path / "section.json")


def test_a_contender_whose_package_is_missing_is_skipped_with_a_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = context(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on an image without it
    build = partial(build_transformers, ctx, spec_of(ctx, "650M"), torch.float32, 4096)
    entry, rows = contender(ctx, build, ["MKT"], timed=True)
    assert rows is None
    assert entry == {"skipped": "module 'transformers' is not installed here: carry its "
                                "wheel (bash scripts/device_wheels.sh; README, Performance)"}


def test_attention_backends_are_read_from_profiler_names() -> None:
    assert classify_attention({"aten::_scaled_dot_product_flash_attention_for_cpu",
                               "aten::scaled_dot_product_attention"}) == ["flash"]
    assert classify_attention({"aten::_scaled_dot_product_efficient_attention",
                               "fmha_cutlassF_f16_aligned_64x64_rf_sm80"}) == ["efficient"]
    assert classify_attention({"aten::_scaled_dot_product_cudnn_attention",
                               "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"}) == ["cudnn"]
    assert classify_attention({"aten::_scaled_dot_product_attention_math",
                               "aten::_scaled_dot_product_flash_attention"}) == ["flash", "math"]
    assert classify_attention({"aten::bmm", "aten::softmax"}) == []


def test_positions_counts_what_the_first_layer_is_called_on() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])

    net = Net()
    counter = Positions(first_layer(net))
    net.layers[0](torch.zeros(3, 7, 8))  # padded (B, T, E)
    net.layers[0](torch.zeros(12, 8))  # packed (sum T, E)
    jagged = torch.nested.nested_tensor([torch.zeros(5, 8), torch.zeros(2, 8)],
                                        layout=torch.jagged)
    net.layers[0](jagged)
    net.layers[1](torch.zeros(100, 8))  # not the first layer: not counted
    assert counter.calls == [21, 12, 7] and counter.total == 40
    counter.remove()
    net.layers[0](torch.zeros(1, 8))
    assert counter.total == 40
    assert first_layer(torch.nn.Linear(2, 2)) is None
