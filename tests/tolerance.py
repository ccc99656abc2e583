"""Numeric tolerances derived from the dtype and the size of the reductions, never bare.

Two computations of the same function that differ only in summation order (a padded
batch against one sequence alone, SDPA against bmm + softmax, AVX2 against AVX512
kernels) round differently. Summing n terms of magnitude m in a dtype with machine
epsilon eps moves the result by about eps * sqrt(n) * m when rounding errors behave as a
random walk (eps * n * m in the worst case); through `depth` sequential reductions (the
layers of a network) the differences add up. `tolerance` returns that estimate times a
safety factor, so a test states what it reduces over instead of a constant that passes
on one CPU and fails on another.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0
"""Margin over the random-walk estimate: rounding is not perfectly random (LayerNorm and
softmax renormalise, fused kernels reassociate differently), so allow several sigma."""


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (float32: 1.19e-7, float16: 9.8e-4)."""
    return float(torch.finfo(dtype).eps)


def tolerance(dtype: torch.dtype = torch.float32, *, terms: int, depth: int = 1,
              magnitude: float = 1.0) -> float:
    """Largest |a - b| expected between two evaluations of the same value in `dtype`.

    terms: the widest reduction feeding each element (a matmul's inner size, the
    positions a mean or softmax runs over); depth: sequential reductions (layers);
    magnitude: the typical size of the values summed.
    """
    return SAFETY * eps(dtype) * math.sqrt(terms) * depth * magnitude


def storage_tolerance(dtype: torch.dtype, *, magnitude: float = 1.0) -> float:
    """Largest change from rounding a value once into `dtype` (half an ulp, relative)."""
    return eps(dtype) / 2 * magnitude


def stored_tolerance(storage: torch.dtype, *, magnitude: float, terms: int, depth: int = 1,
                     compute: torch.dtype = torch.float32) -> float:
    """Largest |a - b| between two evaluations computed in `compute`, each stored in `storage`.

    Rows in esm_all.pt are computed in fp32 and stored as fp16: two runs that differ by
    the compute tolerance can land on either side of an fp16 rounding boundary, so their
    stored values may differ by the compute difference plus one rounding on each side
    (one fp16 ulp at `magnitude`, the largest |value| stored). `terms` and `depth` describe
    the computation as for `tolerance`.
    """
    return (2 * storage_tolerance(storage, magnitude=magnitude)
            + tolerance(compute, terms=terms, depth=depth, magnitude=magnitude))


def low_precision_tolerance(dtype: torch.dtype, *, depth: int, magnitude: float) -> float:
    """Largest |a - b| expected between a network's states computed in a low-precision
    `dtype` (float16, bfloat16) and the same states computed in float32.

    Here the error is not summation order but storage: every layer stores its outputs
    (and the residual stream) in `dtype`, a relative error of about eps(dtype) per element
    per layer, while matmuls and norms accumulate in float32 inside the kernels, so the
    width of the reductions barely matters. Independent roundings over `depth` layers add
    up as a random walk, eps * sqrt(depth) relative, of values up to `magnitude` (the
    largest |state|); `SAFETY` covers the amplification through LayerNorm and attention.
    Measured on tiny random ESM2s (2-6 layers, 1,022 residues): 1.6-2 eps * magnitude.
    """
    return SAFETY * eps(dtype) * math.sqrt(depth) * magnitude
