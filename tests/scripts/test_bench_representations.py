"""scripts/bench_representations.py --quick --arch 8M: both parts run, the JSON has the
figures issue 14 asks for, and the parity figures are within tolerances derived from the
dtype and the network's reductions (tests/tolerance.py), not bare constants."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.tolerance import stored_tolerance, tolerance

ROOT = Path(__file__).resolve().parents[2]


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (registered while the test runs: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(
        "bench_representations", ROOT / "scripts" / "bench_representations.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_representations_quick_8m(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    summary = load_script(monkeypatch).main(["--quick", "--arch", "8M", "--profile"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == summary
    assert any("per_tok / mean" in line for line in printed[:-1])
    assert {"arch", "parity", "per_tok_cost", "machine"} <= set(summary)
    assert summary["arch"] == "8M" and summary["quick"] is True

    parity = summary["parity"]
    layers, dim, depth = parity["layers"], summary["embed_dim"], summary["num_layers"]
    assert layers == [depth, depth // 2]
    for layer in layers:
        magnitude = parity["max_abs_state"][f"layer{layer}"]
        assert math.isfinite(magnitude) and magnitude > 0
        # the widest reduction is fc2's inner size (4 * dim), through every layer
        fp32 = tolerance(torch.float32, terms=4 * dim, depth=depth, magnitude=magnitude)
        for engine in ("fast", "reference"):
            diff = parity[engine][f"per_tok_layer{layer}"]
            assert math.isfinite(diff) and diff <= fp32, (engine, layer, diff, fp32)
        stored = parity["store_fp16"][f"layer{layer}"]
        bound = stored_tolerance(torch.float16, magnitude=magnitude, terms=4 * dim,
                                 depth=depth)
        assert math.isfinite(stored["max_abs_diff"]) and stored["max_abs_diff"] <= bound
        assert stored["max_abs_diff"] <= stored["global_bound"]
        assert stored["max_ratio_to_elementwise_bound"] <= 1.0
        if layer == depth:  # pooling="per_residue" hands back the same states as per_tok
            for engine in ("fast", "reference"):
                assert parity[engine][f"per_residue_vs_per_tok_layer{layer}"] <= fp32
    assert parity["store_fp16"]["proteins_stored"] == parity["n_proteins"]

    cost = summary["per_tok_cost"]
    assert {"ratio_median", "ratio_best", "seconds_mean", "seconds_per_tok",
            "per_tok_output_mb", "within_target", "profile"} <= set(cost)
    assert cost["ratio_median"] > 0 and len(cost["seconds_per_tok"]) == cost["repeats"]
    assert cost["profile"]["seconds"]["forward (embed._forward_or_none)"] > 0
    machine = summary["machine"]
    assert machine["cpu_count"] and machine["torch"] == torch.__version__
