"""Packed (unpadded) batches for the fast engine: where each sequence lies in one stream,
and attention that never sees a position of another sequence or any padding.

A padded (B, T) batch makes every linear layer, LayerNorm, GELU and rotary run on the
padding too (12% of positions at 4,096 tokens, more at GPU-sized budgets), and attention
needs an additive mask, which rules out the flash kernels. Packed, the batch's tokens
are one [N, E] stream (N = the sum of the sequences' lengths, BOS and EOS included):

    stream:      | BOS a1 .. an EOS | BOS b1 .. bm EOS | ...
    cu_seqlens:  0                  n+2               n+m+4 ...   (B + 1,) boundaries
    positions:   0  1  ..  n  n+1   0  1  ..  m  m+1             rotary, per sequence
    segments:    0  0  ..  0  0     1  1  ..  1  1               sequence of each token

Everything but attention is row-wise, so it runs on the stream as it is; attention runs
per sequence, by one of three mechanisms (`attention_for`, chosen by measurement; the
figures are in NOTES-README.md):

- "flash": flash-attn's ``flash_attn_varlen_qkvpacked_func`` (cu_seqlens), on CUDA in
  fp16/bf16 when the package is installed (import-guarded: it is not a dependency);
- "nested": ``F.scaled_dot_product_attention`` over nested jagged tensors
  (``torch.nested``, ``layout=torch.jagged``); on CUDA torch sends it to its own flash
  kernel with cumulative sequence lengths. The CUDA default without flash-attn. On CPU it
  is correct but 60x slower than "segments" (torch 2.13 falls back per sequence);
- "segments": one 4-D SDPA call per sequence on views of the stream. The CPU default:
  4-D inputs reach the CPU flash kernel (3-D ones the math kernel, 5-8x slower), and the
  per-call overhead is under 1% of a layer's matmuls on CPU.

FlexAttention with a document mask was measured too and left out: on CPU it runs 8x
slower than "segments" compiled and 50x eager (plus ~80 s of compilation), and on CUDA
it recompiles or rebuilds its block mask for every batch shape.

Lengths are always known on the host (`Packing.lengths`), so no mechanism reads a device
tensor to learn a shape: nothing here makes the host wait for the device.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Literal, get_args

import torch
import torch.nn.functional as F

Attention = Literal["flash", "nested", "segments"]
ATTENTIONS: tuple[str, ...] = get_args(Attention)
AttentionFn = Callable[[torch.Tensor, "Packing"], torch.Tensor]
"""(N, 3, H, D) packed q (already scaled), k, v and their `Packing` -> (N, H, D)."""


@dataclass(frozen=True, slots=True)
class Packing:
    """Where each of a batch's sequences lies in a packed stream.

    `lengths` (tokens per sequence, BOS and EOS included) and `offsets` live on the host;
    `positions` and `segments` (N,) and `cu_seqlens` (B + 1,) on the stream's device,
    int64 (index_select, index_add and torch.nested take them as they are; flash-attn
    gets an int32 copy made on the device)."""

    lengths: tuple[int, ...]
    offsets: tuple[int, ...]  # (B + 1,) starts, offsets[-1] = N
    positions: torch.Tensor  # (N,) position of each token within its sequence
    segments: torch.Tensor  # (N,) index of each token's sequence
    cu_seqlens: torch.Tensor  # (B + 1,) the offsets, on the device

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @classmethod
    def build(cls, lengths: tuple[int, ...] | list[int], device: torch.device) -> Packing:
        """The packing of sequences of these token counts, its index tensors built on the
        host and copied to `device` once (pinned, non_blocking on CUDA)."""
        host = host_index(tuple(lengths))
        return cls.from_index(tuple(lengths), upload(host, device))

    @classmethod
    def from_index(cls, lengths: tuple[int, ...], index: torch.Tensor) -> Packing:
        """The packing whose `host_index` (positions | segments | cu_seqlens) is already
        on the device: three views of that one tensor."""
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a packing needs sequences of at least one token: {lengths}")
        total = sum(lengths)
        return cls(lengths=lengths, offsets=tuple(accumulate(lengths, initial=0)),
                   positions=index[:total], segments=index[total : 2 * total],
                   cu_seqlens=index[2 * total : 2 * total + len(lengths) + 1])

    def pieces(self, max_tokens: int) -> list[tuple[slice, Packing]]:
        """Consecutive groups of whole sequences of at least `max_tokens` tokens (or one
        sequence), each as its rows of the stream and its own packing (views, rebased):
        how the CPU keeps a chunk's activations in cache."""
        out, first = [], 0
        while first < len(self.lengths):
            last, size = first, 0
            while last < len(self.lengths) and (size < max_tokens or last == first):
                size += self.lengths[last]
                last += 1
            out.append((slice(self.offsets[first], self.offsets[last]),
                        self._part(first, last)))
            first = last
        return out

    def _part(self, first: int, last: int) -> Packing:
        if (first, last) == (0, len(self.lengths)):
            return self
        rows = slice(self.offsets[first], self.offsets[last])
        return Packing(lengths=self.lengths[first:last],
                       offsets=tuple(o - self.offsets[first]
                                     for o in self.offsets[first : last + 1]),
                       positions=self.positions[rows], segments=self.segments[rows] - first,
                       cu_seqlens=self.cu_seqlens[first : last + 1] - self.offsets[first])


def host_index(lengths: tuple[int, ...]) -> torch.Tensor:
    """(2N + B + 1,) int64 on the host: positions | segments | cu_seqlens of a packing."""
    counts = torch.tensor(lengths, dtype=torch.int64)
    total = int(sum(lengths))
    starts = torch.tensor(list(accumulate(lengths, initial=0)), dtype=torch.int64)
    segments = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    positions = torch.arange(total) - starts[:-1].repeat_interleave(counts)
    return torch.cat((positions, segments, starts))


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device` without making the host wait: on CUDA through pinned memory with
    non_blocking (a pageable copy would block); on the CPU, `host` itself."""
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def attend_segments(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One SDPA call per sequence on 4-D views of the (N, 3, H, D) stream -> (N, H, D)."""
    out = qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3])
    for start, end in pairwise(packing.offsets):
        q, k, v = (qkv[start:end, i].transpose(0, 1)[None] for i in range(3))  # (1, H, n, D)
        attended = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        out[start:end] = attended[0].transpose(0, 1)
    return out


def attend_nested(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    """SDPA over nested jagged tensors (B, H, j, D); the max and min lengths are passed
    from the host so torch never reads them from the device."""
    def jagged(i: int) -> torch.Tensor:
        nested = torch.nested.nested_tensor_from_jagged(
            qkv[:, i].contiguous(), packing.cu_seqlens, min_seqlen=min(packing.lengths),
            max_seqlen=packing.max_len)
        return nested.transpose(1, 2)  # (B, H, j, D)

    out = F.scaled_dot_product_attention(jagged(0), jagged(1), jagged(2), scale=1.0)
    return out.transpose(1, 2).values()  # (N, H, D)


def attend_flash(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    """flash-attn's varlen kernel on the (N, 3, H, D) stream as it is (fp16/bf16, CUDA)."""
    flash = importlib.import_module("flash_attn")  # optional: `attention_for` checks first
    out: torch.Tensor = flash.flash_attn_varlen_qkvpacked_func(
        qkv, packing.cu_seqlens.to(torch.int32), packing.max_len, softmax_scale=1.0)
    return out


ATTEND: dict[str, AttentionFn] = {
    "flash": attend_flash, "nested": attend_nested, "segments": attend_segments}


def flash_attn_available() -> bool:
    """Whether flash-attn is installed (it is optional; never imported to find out)."""
    return importlib.util.find_spec("flash_attn") is not None


def attention_for(device: torch.device, dtype: torch.dtype) -> Attention:
    """The measured best mechanism for a device and compute dtype (module docstring)."""
    if device.type != "cuda":
        return "segments"
    if dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        return "flash"
    return "nested"
