"""How the device check measures: GEMM peak, memory, computed positions, attention kernels.

Each measure is written so that it reads the same on the lent GPU and on CPU (--quick):

- `gemm_rate`: the MFU denominator, a dense n x n x n product with random inputs, timed
  per repetition with CUDA events after warm-ups (host clock on CPU), median and best;
- `Memory`: per contender, the bytes its weights hold and the peak while it runs
  (torch.cuda.max_memory_allocated after a reset; None on CPU);
- `Positions`: token positions the network's first layer actually computes, counted by a
  forward pre-hook (padded (B, T, E), packed (sum T, E) and nested jagged inputs alike),
  so the padding fraction is what ran, not what a plan predicts;
- `attention_profile`: which attention ran, from torch.profiler's operator and kernel
  names (SDPA's flash / efficient / cudnn / math backends, FlexAttention, flash-attn, or
  none: fair-esm's own bmm + softmax);
- `machine_facts`: what it ran on (versions from metadata, GPU, SDPA and TF32 settings).

Only the standard library and torch are imported at the top (machine_facts borrows
bench_embed's CPU-name reader, which needs nothing more).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

Result = dict[str, Any]
GIB = 2**30

ATTENTION_BACKENDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # checked in this order: cuDNN's kernel names also contain "flash"
    ("cudnn", ("_scaled_dot_product_cudnn_attention", "cudnn")),
    ("flex", ("flex_attention",)),
    ("flash_attn", ("flash_attn::", "flash_attn_varlen", "flash_attn_func")),
    ("flash", ("_scaled_dot_product_flash_attention", "_flash_attention_forward",
               "flash_fwd")),
    ("efficient", ("_scaled_dot_product_efficient_attention",
                   "_efficient_attention_forward", "fmha_cutlass", "MemEffAttention")),
    ("math", ("_scaled_dot_product_attention_math",)),
)
"""Backend -> substrings of profiler event names (aten operators on any device, CUDA
kernel names on a GPU) that show it ran."""
PACKAGES = ("torch", "numpy", "fair-esm", "aiolimiter", "aiohttp", "transformers", "typer",
            "tqdm", "safetensors", "ray", "flash-attn")
"""Versions the machine section reports (from metadata: nothing is imported)."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Collect garbage and hand cached GPU blocks back, so the next contender starts
    from what is really allocated (peak memory is read on CUDA only: on the CPU a full
    collection of a heap holding transformers costs 0.2 s and frees nothing measured)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def gemm_rate(n: int, dtype: torch.dtype, device: torch.device, *, reps: int,
              warmup: int = 3) -> Result:
    """FLOP/s of an n x n @ n x n product in `dtype`: `reps` timed repetitions (CUDA events
    on a GPU, the host clock elsewhere) after `warmup` untimed ones, on random inputs
    (zeros run faster than real data on some GPUs)."""
    generator = torch.Generator(device="cpu").manual_seed(n)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    seconds: list[float] = []
    if device.type == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        for start, end in pairs:
            start.record()
            torch.mm(a, b, out=out)
            end.record()
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in pairs]
    else:
        for _ in range(reps):
            began = time.perf_counter()
            torch.mm(a, b, out=out)
            seconds.append(time.perf_counter() - began)
    if not bool(torch.isfinite(out).all()):
        raise ArithmeticError(f"{dtype} GEMM produced non-finite values")
    flop = 2 * n**3
    return {"n": n, "reps": reps, "timer": "cuda_events" if device.type == "cuda" else "host",
            "median_tflop_per_s": round(flop / statistics.median(seconds) / 1e12, 3),
            "best_tflop_per_s": round(flop / min(seconds) / 1e12, 3),
            "times_ms": [round(s * 1e3, 3) for s in seconds]}


class Memory:
    """GPU memory of one contender: `begin` before it is built, `built` after, `running`
    before its timed run, `end` after; `figures` gives GiB (empty on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.base = self.weights = self.peak = 0

    def begin(self) -> None:
        if self.cuda:
            release(self.device)
            self.base = torch.cuda.memory_allocated(self.device)

    def built(self) -> None:
        if self.cuda:
            release(self.device)
            self.weights = torch.cuda.memory_allocated(self.device) - self.base

    def running(self) -> None:
        if self.cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self) -> None:
        if self.cuda:
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base

    def figures(self) -> Result:
        if not self.cuda:
            return {}
        return {"weights_gib": round(self.weights / GIB, 3),
                "peak_gib": round(self.peak / GIB, 3)}


def first_layer(network: nn.Module) -> nn.Module | None:
    """The first transformer layer of fair-esm's ESM2 (layers), our engines (layers) or
    transformers' EsmModel (encoder.layer); None when there is none to hook."""
    for path in ("layers", "encoder.layer", "encoder.layers", "blocks"):
        node: Any = network
        for name in path.split("."):
            node = getattr(node, name, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node[0]
    return None


class Positions:
    """Counts the token positions (padded ones included) that `layer` is called on."""

    def __init__(self, layer: nn.Module | None) -> None:
        self.calls: list[int] = []
        self._layer = layer
        self._handle = (None if layer is None else
                        layer.register_forward_pre_hook(self._seen, with_kwargs=True))
        packed = getattr(layer, "forward_packed", None)
        if layer is not None and callable(packed):  # the packed engine calls it directly,
            def counted(*args: Any, **kwargs: Any) -> Any:  # so no forward hook fires
                self._seen(layer, args, kwargs)
                return packed(*args, **kwargs)

            layer.forward_packed = counted  # type: ignore[method-assign]

    def _seen(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> None:
        states = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if isinstance(states, torch.Tensor):
            self.calls.append(positions(states))

    @property
    def hooked(self) -> bool:
        return self._handle is not None

    @property
    def total(self) -> int:
        return sum(self.calls)

    def reset(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        if self._layer is not None and "forward_packed" in vars(self._layer):
            del self._layer.forward_packed  # back to the class's method


def positions(states: torch.Tensor) -> int:
    """Token positions in a layer's input: (B, T, E), (T, B, E), (sum T, E), or a nested
    jagged (B, j, E) tensor (its packed values)."""
    if states.is_nested:
        return int(states.values().numel() // states.shape[-1])
    return int(states.numel() // states.shape[-1])


def attention_profile(run: Callable[[], object], device: torch.device) -> Result:
    """Run `run` once under torch.profiler; which attention backend(s) ran, from operator
    and kernel names (see ATTENTION_BACKENDS)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    names: set[str] = set()
    kernels: set[str] = set()
    for event in prof.events():
        names.add(event.name)
        if "cuda" in str(getattr(event, "device_type", "")).lower():
            kernels.add(event.name)
        kernels.update(k.name for k in getattr(event, "kernels", ()) or ())
    backends = classify_attention(names | kernels)
    return {"sdpa_backend": backends or ["none (no SDPA call: bmm + softmax)"],
            "attention_ops": sorted(n for n in names if _attention_name(n))[:8],
            "attention_kernels": sorted(k[:120] for k in kernels if _attention_name(k))[:8]}


def classify_attention(names: set[str]) -> list[str]:
    """The attention backends these profiler event names show, in ATTENTION_BACKENDS
    order; each name counts for the first backend it matches."""
    found: list[str] = []
    for name in names:
        for backend, marks in ATTENTION_BACKENDS:
            if any(mark in name for mark in marks):
                if backend not in found:
                    found.append(backend)
                break
    order = [backend for backend, _ in ATTENTION_BACKENDS]
    return sorted(found, key=order.index)


def _attention_name(name: str) -> bool:
    lowered = name.lower()
    return any(mark in lowered for mark in ("attention", "flash", "fmha", "sdpa", "softmax"))


def machine_facts(device: torch.device) -> Result:
    """What the figures are measured on: versions, CPU, load, GPU and its settings;
    `cuda_works` says whether this process could compute on `device`'s GPU."""
    from bench_embed import cpu_model

    info: Result = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "platform": platform.platform(),
        "processor": cpu_model() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2), "packages": package_versions(),
        "cuda_available": torch.cuda.is_available(), "cuda_works": False,
    }
    if device.type != "cuda":
        return info
    try:
        x = torch.arange(4.0, device=device)
        assert float((x * x).sum()) == 14.0
        props = torch.cuda.get_device_properties(device)
        cuda = torch.backends.cuda
        info.update({
            "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "total_memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
            "matmul_allow_tf32": cuda.matmul.allow_tf32,
            "sdpa_enabled": {
                "flash": cuda.flash_sdp_enabled(), "efficient": cuda.mem_efficient_sdp_enabled(),
                "math": cuda.math_sdp_enabled(),
                "cudnn": getattr(cuda, "cudnn_sdp_enabled", lambda: None)()},
            "cuda_works": True})
    except Exception as exc:  # recorded: the parent decides
        info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    return info


def package_versions() -> dict[str, str]:
    """Installed versions, read from metadata (nothing is imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
