"""One command that proves the GPU path: GEMM peak, parity, speed, OOM halving, end to end.

On one CUDA GPU it finishes within 8 minutes, model construction included (random
weights at the published architectures, built on the GPU: nothing is downloaded), prints
one JSON object and writes it to --out after every section. Each section runs in its own
process under a hard time cap (scripts/device_runner.py): one that overruns is recorded as
timed out with what it had measured, and the rest goes on. Every figure is measured in
this run:

- machine: GPU, driver-side facts, package versions, SDPA backends enabled;
- gemm: the MFU denominator, a dense 8192^3 product in fp16, bf16 and fp32 (TF32 as
  torch leaves it), several repetitions timed with CUDA events, median and best;
- speed at 650M and 3B: tokens/s of each engine of this build (fp16), the same engine
  with toks_per_batch "auto" when this build has it, transformers' EsmModel with sdpa in
  fp16, fair-esm's esm-extract loop in fp16 (and fp32 at 650M), all on the same
  sequences and weights; per contender the token positions its first layer computed
  (padding fraction of what actually ran), MFU against the gemm median of its dtype,
  weights and peak GPU memory (contenders are built and freed one at a time), and which
  attention ran (profiler operator and kernel names: flash / efficient / cudnn / math);
- parity at 650M and 3B: every engine in fp16 and bf16 (and fair-esm's own loop in fp16,
  as a yardstick) against fair-esm's loop in fp32, with a pass/fail limit derived from
  the dtype (tests/tolerance.py: eps(dtype) x sqrt(layers) x |rows| x safety);
- end_to_end: data/'s 2,000-gene HVG list through the fake Ensembl server into
  esm_all.pt at 650M (scripts/bench_pipeline.py), row cache off;
- oom: under a memory cap a batch that does not fit is halved, rows still within limit;
- ray: `--ray local` gives the single-process rows (skipped where Ray is not installed).

"goals" puts issue 21's targets (and issue 16's) next to the figures. With --quick it
runs on CPU with tiny architectures in seconds: sections that need CUDA say so.

    python scripts/device_check.py --out device_check.json           # on a CUDA machine
    python scripts/device_check.py --quick --out /tmp/quick.json     # CI, CPU

Only the standard library and torch are imported at the top: a package missing on the
lent machine (scripts/device_wheels.sh carries them) skips the contender or section that
needs it, with a line in the JSON, instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path[:0] = [str(ROOT), str(SCRIPTS)]

from device_runner import Result, Runner, Section, preload  # noqa: E402
from device_sections import (  # noqa: E402
    end_to_end,
    gemm,
    machine,
    oom,
    parity_at,
    ray,
    speed_at,
)

MODEL_MODULES = ("bench_embed", "esm", "esm2_batch.models", "esm2_batch.embedding.embed",
                 "esm2_batch.embedding.options", "tests.tolerance", "tests.fakes.tiny_hf")
E2E_MODULES = ("bench_pipeline", "esm2_batch.run.gene_mode", "esm2_batch.sources.ensembl_rest",
               "tests.fakes.ensembl")
RAY_MODULES = ("esm2_batch.run.ray_stage", "tests.fakes.tiny_esm")
"""What the sections import (transformers and ray themselves are imported only inside the
contender or section that uses them: transformers may probe CUDA on import)."""
CPU_ONLY_MODULES = ("transformers.models.esm.modeling_esm",)
"""Preloaded only when the run is on the CPU (--quick), where no child needs CUDA: each
speed section's child would otherwise import transformers' ESM code itself (3 of its 5 s)."""

MACHINE = Section(("machine",), machine, cap_s=60)
SECTIONS = (  # in order of what the lent minutes are for; caps are hard, in seconds
    Section(("gemm",), gemm, cap_s=30),
    Section(("speed", "650M"), partial(speed_at, size="650M"), cap_s=100,
            modules=MODEL_MODULES),
    Section(("parity", "650M"), partial(parity_at, size="650M"), cap_s=50,
            modules=MODEL_MODULES),
    Section(("speed", "3B"), partial(speed_at, size="3B"), cap_s=80, modules=MODEL_MODULES),
    Section(("parity", "3B"), partial(parity_at, size="3B"), cap_s=60, modules=MODEL_MODULES),
    Section(("end_to_end",), end_to_end, cap_s=90, modules=MODEL_MODULES + E2E_MODULES),
    Section(("oom",), oom, cap_s=40, modules=MODEL_MODULES),
    Section(("ray",), ray, cap_s=30, modules=MODEL_MODULES + RAY_MODULES),
)
MODULES = tuple(dict.fromkeys(m for s in SECTIONS for m in s.modules))
QUICK_CAP_S = 600.0
"""--quick (CI): caps that never trip on a slow, loaded machine; the cap itself is tested
with a section that blocks (tests/scripts/test_device_check.py)."""

HUMAN_PROTEOME_ISOFORMS = 90_000
GOALS: dict[str, tuple[float, str]] = {  # name: (goal, "min" = at least, "max" = at most)
    "speedup_fast_vs_transformers_sdpa_fp16_650M": (1.3, "min"),  # issue 21
    "mfu_fast_650M": (0.5, "min"),
    "padding_fraction_fast_650M": (0.0, "max"),
    "human_proteome_650M_s_estimated": (120.0, "max"),
    "speedup_fast_fp16_vs_fairesm_fp32_650M": (5.0, "min"),  # issue 16
    "end_to_end_2000_genes_650M_s": (60.0, "max"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU, tiny architectures, seconds: keeps the script from rotting")
    p.add_argument("--out", type=Path, default=Path("device_check.json"))
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    names = sorted({s.path[0] for s in SECTIONS} | {s.name for s in SECTIONS})
    p.add_argument("--skip", action="append", default=[], choices=names,
                   help="a section (speed) or one size of it (speed/3B); repeatable")
    p.add_argument("--budget_s", type=float, default=None,
                   help="wall budget; a section gets at most what is left of it "
                        "(default 450 s: the run fits 8 minutes; --quick: 3600 s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.quick else 450.0
    return args


def skipped(section: Section, skip: list[str]) -> bool:
    return section.name in skip or section.path[0] in skip


def status(result: Result) -> str:
    """One word per section for the summary: error, timed_out, missing_package (carry
    its wheel), skipped, fail or ok."""
    if "error" in result:
        return "error"
    if result.get("timed_out"):
        return "timed_out"
    if "skipped" in result:
        return "missing_package" if "not installed here" in result["skipped"] else "skipped"
    return "fail" if result.get("pass") is False else "ok"


def goals(report: Result) -> Result:
    """The targets next to what this run measured (None where not measured)."""
    speed = report.get("speed", {}).get("650M", {})

    def figure(label: str, key: str) -> Any:
        entry = speed.get(label, {})
        return entry.get(key) if isinstance(entry, dict) else None

    def ratio(a: str, b: str) -> float | None:
        x, y = figure(a, "tokens_per_s"), figure(b, "tokens_per_s")
        return round(x / y, 3) if x and y else None

    fast_rate, mean_tokens = figure("fast", "tokens_per_s"), speed.get("mean_tokens_per_seq")
    e2e = report.get("end_to_end", {})
    measured = {
        "speedup_fast_vs_transformers_sdpa_fp16_650M": ratio("fast", "transformers_sdpa"),
        "mfu_fast_650M": figure("fast", "mfu"),
        "padding_fraction_fast_650M": figure("fast", "padding_fraction"),
        "human_proteome_650M_s_estimated": (
            round(HUMAN_PROTEOME_ISOFORMS * mean_tokens / fast_rate, 1)
            if fast_rate and mean_tokens else None),
        "speedup_fast_fp16_vs_fairesm_fp32_650M": ratio("fast", "fairesm_fp32"),
        "end_to_end_2000_genes_650M_s": e2e.get("e2e_s") if e2e.get("genes") == 2000 else None,
    }
    out: Result = {
        name: {"goal": goal, "measured": measured[name],
               "met": None if measured[name] is None else (
                   measured[name] >= goal if sense == "min" else measured[name] <= goal)}
        for name, (goal, sense) in GOALS.items()}
    out["human_proteome_650M_s_estimated"]["how"] = (
        f"{HUMAN_PROTEOME_ISOFORMS:,} isoforms x this run's mean tokens per sequence / the "
        "fast engine's tokens/s at 650M (fetching not included)")
    return out


def sections_run(report: Result) -> dict[str, str]:
    """section name -> status, for every section in the report."""
    out: dict[str, str] = {}
    for section in (MACHINE, *SECTIONS):
        node: Any = report
        for key in section.path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node:
            out[section.name] = status(node)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = Runner(args, args.out, budget_s=args.budget_s)
    device = args.device or ("cpu" if args.quick else "cuda")
    runner.report.update({"quick": args.quick, "device": device, "budget_s": args.budget_s,
                          "start_method": runner.method})
    if runner.method == "fork":  # children inherit these; spawned ones import their own
        cpu_only = CPU_ONLY_MODULES if device == "cpu" else ()
        runner.report["preload_failed"] = preload(MODULES + cpu_only)
    found = runner.run(MACHINE)
    if runner.method == "fork" and found.get("cuda_error"):
        runner.method = "spawn"  # a forked child could not use CUDA: spawn the rest
        runner.report["start_method"] = "spawn (a forked child could not initialise CUDA)"
        found = runner.run(MACHINE)
    if device.startswith("cuda") and not found.get("cuda_works"):
        runner.report["error"] = "CUDA is not usable here: use --quick on CPU"
        runner.save()
        runner.close()
        print(json.dumps(runner.report))
        return 2
    cap = QUICK_CAP_S if args.quick else None
    for section in SECTIONS:
        runner.run(section, skip=skipped(section, args.skip), cap_s=cap)
    runner.report["goals"] = (goals(runner.report) if not args.quick else
                              {"skipped": "goals are read on CUDA at the published sizes"})
    runner.report["status"] = sections_run(runner.report)
    runner.save()
    runner.close()
    print(json.dumps(runner.report))
    bad = [name for name, word in runner.report["status"].items()
           if word in ("error", "timed_out", "missing_package", "fail")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
