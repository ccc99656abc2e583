"""ESM C's two published weight layouts, read into the original one (`read_esmc_state`),
whose names esmc.py's module carries, so the original file loads as it is:

- the original state dict (``data/weights/esmc_300m_2024_12_v0.pth``): ``embed.weight``,
  ``transformer.blocks.N.attn.layernorm_qkv.{0.weight,0.bias,1.weight}``,
  ``transformer.blocks.N.attn.{q_ln,k_ln,out_proj}.weight``,
  ``transformer.blocks.N.ffn.{0.weight,0.bias,1.weight,3.weight}``,
  ``transformer.norm.weight``, ``sequence_head.*`` (the LM head, not loaded);
- the Hugging Face layout (``biohub/ESMC-300M``, transformers' ``EsmcModel``):
  ``esmc.embed_tokens``, ``esmc.layers.N.{input_layernorm, post_attention_layernorm}``,
  ``esmc.layers.N.self_attn.{q,k,v,o}_proj, q_norm, k_norm``,
  ``esmc.layers.N.mlp.{gate,up,down}_proj``, ``esmc.norm``, ``lm_head.*`` (not loaded);
  q/k/v are fused into ``layernorm_qkv.1`` and gate/up into ``ffn.1`` (gate first: silu
  applies to it). The ``esmc.`` prefix is optional (``EsmcModel`` saved directly).

Only a ``config.json`` says how many heads there are (esmc.py infers the rest from shapes
and checks every key and shape). The files themselves are read by weights.py; any
unreadable one makes `is_esmc_source`, a probe for choosing a backend, answer False.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from esm2_batch.errors import ModelError, name_some
from esm2_batch.models.rotary import ROTARY_BASE, rope_theta
from esm2_batch.models.weights import (
    CONFIG_FILE,
    find_weights_file,
    locate,
    read_hf_config,
    read_hf_weights,
    read_weights_file,
    weight_names,
)

Tensor = torch.Tensor

_HF_BLOCK = re.compile(r"^layers\.(\d+)\.")
_ORIGINAL_HEAD = re.compile(r"^sequence_head\.")
_HF_HEAD = re.compile(r"^lm_head\.")


def read_esmc_state(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Tensor], int | None, float, Path]:
    """(original-layout state without the LM head, heads from config.json or None, rotary
    base, the file or folder read) for any source `load_esmc` accepts."""
    source = _resolve_source(path)
    if source.is_dir():
        return _read_folder(source)
    return _to_original(read_weights_file(source), source), None, ROTARY_BASE, source


def is_esmc_source(path: str | os.PathLike[str]) -> bool:
    """Whether `path` (file or folder) holds ESM C weights; never raises. Reads only a
    config.json or the weight names, for choosing a backend from ``--model_path``."""
    source = Path(path).expanduser()
    try:
        if source.is_dir():
            if _original_weights(source) is not None:
                return True
            return read_hf_config(source).get("model_type") == "esmc"
        if source.is_file():
            return _layout(weight_names(source)) is not None
    except Exception:  # a probe: any unreadable file is simply not ESM C
        return False
    return False


def _resolve_source(path: str | os.PathLike[str]) -> Path:
    """An existing file or folder, else a hub id resolved in the local HF cache."""
    source = locate(path)
    if source is None:
        raise ModelError(f"ESM C weights not found: {Path(path).expanduser()} (pass a .pth "
                         f"file, a Hugging Face folder, or a hub id like biohub/ESMC-300M "
                         f"that is in the HF cache)")
    return source


def _read_folder(folder: Path) -> tuple[dict[str, Tensor], int | None, float, Path]:
    """A Hugging Face folder (config.json + weights), else the original hub folder."""
    original = _original_weights(folder)
    if original is not None and not (folder / CONFIG_FILE).is_file():
        return _to_original(read_weights_file(original), original), None, ROTARY_BASE, original
    config = read_hf_config(folder)
    if config.get("model_type", "esmc") != "esmc":
        raise ModelError(f"cannot load {folder}: config.json has model_type "
                         f"{config.get('model_type')!r}, not 'esmc'")
    _check_hf_config(config, folder)
    if original is not None and find_weights_file(folder) is None:
        state = read_weights_file(original)
    else:
        state = read_hf_weights(folder)
    heads = config.get("num_attention_heads")
    return (_to_original(state, folder), int(heads) if heads else None,
            rope_theta(config), folder)


def _original_weights(folder: Path) -> Path | None:
    """The ``data/weights/*.pth`` of the original hub repository, if there is exactly one."""
    found = sorted((folder / "data" / "weights").glob("*.pth"))
    return found[0] if len(found) == 1 else None


def _check_hf_config(config: Mapping[str, Any], folder: Path) -> None:
    """Refuse config.json settings this implementation does not have (one line each)."""
    head_dim = config.get("head_dim")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    checks = (
        (config.get("hidden_act", "silu") == "silu", "hidden_act is not silu"),
        (not config.get("attention_bias") and not config.get("mlp_bias"), "biases are set"),
        (config.get("num_key_value_heads") in (None, heads), "grouped-query attention"),
        (head_dim is None or not heads or not hidden or head_dim * heads == hidden,
         "head_dim x heads != hidden_size"),
    )
    for ok, why in checks:
        if not ok:
            raise ModelError(f"cannot load {folder}: unsupported ESM C config ({why})")


def _layout(names: Iterable[str]) -> str | None:
    """ "original", "hf" or None (not ESM C) from tensor names."""
    names = set(names)
    if "embed.weight" in names and "transformer.norm.weight" in names:
        return "original"
    if {"esmc.embed_tokens.weight", "esmc.norm.weight"} <= names:
        return "hf"
    if {"embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_norm.weight"} <= names:
        return "hf"
    return None


def _to_original(state: Mapping[str, Tensor], where: Path) -> dict[str, Tensor]:
    """The original-layout weights of `state` (either layout), LM head dropped."""
    layout = _layout(state)
    if layout is None:
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint (neither the original "
                         f"embed./transformer. names nor the Hugging Face esmc. names)")
    if layout == "original":
        return {key: value for key, value in state.items() if not _ORIGINAL_HEAD.match(key)}
    return _hf_to_original(state, where)


def _hf_to_original(state: Mapping[str, Tensor], where: Path) -> dict[str, Tensor]:
    """Rename (and fuse) Hugging Face ESM C weights; unknown keys are kept so that
    `check_state` reports them, missing ones are reported here."""
    prefix = "esmc." if "esmc.embed_tokens.weight" in state else ""
    body = {key[len(prefix):]: value for key, value in state.items()
            if key.startswith(prefix) and not _HF_HEAD.match(key)}
    others = [key for key in state if not key.startswith(prefix) and not _HF_HEAD.match(key)]
    if others:
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint "
                         f"(unexpected {name_some(others)})")
    out = {"embed.weight": _pop(body, "embed_tokens.weight", where),
           "transformer.norm.weight": _pop(body, "norm.weight", where)}
    layers = sorted({int(m.group(1)) for key in body if (m := _HF_BLOCK.match(key))})
    for layer in layers:
        out.update(_hf_block(body, layer, where))
    out.update(body)  # leftovers: unknown names, reported by check_state
    return out


def _hf_block(body: dict[str, Tensor], layer: int, where: Path) -> dict[str, Tensor]:
    """One block's original-layout weights from its HF weights (removed from `body`)."""
    def take(name: str) -> Tensor:
        return _pop(body, f"layers.{layer}.{name}", where)

    to = f"transformer.blocks.{layer}."
    qkv = torch.cat([take(f"self_attn.{p}_proj.weight") for p in "qkv"])  # (3d, d)
    gate_up = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")])  # (2h, d)
    return {
        f"{to}attn.layernorm_qkv.0.weight": take("input_layernorm.weight"),
        f"{to}attn.layernorm_qkv.0.bias": take("input_layernorm.bias"),
        f"{to}attn.layernorm_qkv.1.weight": qkv,
        f"{to}attn.q_ln.weight": take("self_attn.q_norm.weight"),
        f"{to}attn.k_ln.weight": take("self_attn.k_norm.weight"),
        f"{to}attn.out_proj.weight": take("self_attn.o_proj.weight"),
        f"{to}ffn.0.weight": take("post_attention_layernorm.weight"),
        f"{to}ffn.0.bias": take("post_attention_layernorm.bias"),
        f"{to}ffn.1.weight": gate_up,
        f"{to}ffn.3.weight": take("mlp.down_proj.weight"),
    }


def _pop(body: dict[str, Tensor], name: str, where: Path) -> Tensor:
    """Remove and return `name`, or fail naming it."""
    if name not in body:
        raise ModelError(f"cannot load {where}: not an ESM C checkpoint (missing {name})")
    return body.pop(name)

