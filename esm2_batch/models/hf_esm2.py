"""ESM2 in the Hugging Face layouts (transformers' ESM, Synthyra's FastESM), mapped onto
fair-esm's official checkpoint layout.

Many users hold ESM2 as a Hugging Face model (``facebook/esm2_t33_650M_UR50D`` in their HF
cache, or a folder with ``config.json`` + ``model.safetensors``) rather than fair-esm's
``.pt``. `read_hf_esm2` renames those weights into exactly the dict fair-esm publishes
(what ``tests/fakes/tiny_esm.official_layout`` writes), so fair-esm's loader
(``fair_esm.build_module``) and both ESM2 engines run them: one ESM2 implementation, one
set of row semantics, and no ``transformers`` at run time (it would pull tokenizers, hub
clients and its own attention/padding code paths into a tool that only needs a state dict).

Two model types share the layout (`MODEL_TYPES`): ``esm`` (transformers' EsmModel /
EsmForMaskedLM) and ``fast_esm`` (Synthyra's FastPLMs FastEsmModel / FastEsmForMaskedLM,
e.g. FastESM2_650: ESM2-650M trained further up to 2,048 tokens). FastESM's modules are
transformers' ESM modules under the same names (its attention differs only in kernels),
so the same map applies; what differs is the training context, which `hf_max_residues`
reports per model type.

The key map (transformers' ``convert_esm.py`` is the reference for the names), after an
optional ``esm.`` prefix (present when ``EsmForMaskedLM`` or any FastESM class saved the
file, absent when ``EsmModel`` did)::

    embeddings.word_embeddings.weight                  embed_tokens.weight
    encoder.layer.N.attention.self.{query,key,value}   layers.N.self_attn.{q,k,v}_proj
    encoder.layer.N.attention.output.dense             layers.N.self_attn.out_proj
    encoder.layer.N.attention.LayerNorm                layers.N.self_attn_layer_norm
    encoder.layer.N.intermediate.dense                 layers.N.fc1
    encoder.layer.N.output.dense                       layers.N.fc2
    encoder.layer.N.LayerNorm                          layers.N.final_layer_norm
    encoder.emb_layer_norm_after                       emb_layer_norm_after
    encoder.layer.N.attention.self.rotary_embeddings.inv_freq   layers.N.self_attn.rot_emb.inv_freq
    rotary_embeddings.inv_freq  (transformers >= 5)    every layer's rot_emb.inv_freq
    lm_head.{dense,layer_norm}, lm_head.bias          lm_head.*
    lm_head.decoder.weight                             (dropped: tied to embed_tokens)

Before that map, the load-time renames transformers itself applies to ``esm`` checkpoints
(its ``conversion_mapping.py``: the "esm" entry plus the "legacy" one it appends) are
applied, because its own ``save_pretrained`` writes the reversed names (seen with 5.24)::

    *.LayerNorm.gamma / *.LayerNorm.beta                 *.LayerNorm.weight / .bias
    encoder.layer.*.attention.self.rotary_embeddings.inv_freq   (a literal "*": the one
                                                         shared buffer)  rotary_embeddings.inv_freq

A name that two stored keys map to (``gamma`` next to ``weight``) is an error, as is any
key outside the map. fair-esm's ESM2 has no decoder matrix of its own: ``lm_head.weight``
is the token embedding parameter itself. So ``lm_head.decoder.weight`` is never loaded
(transformers leaves it out of files whose decoder is tied; FastESM stores an untied one,
which loaded would overwrite the embeddings): the decoder is tied to the embeddings here,
and the logits of a model with an untied decoder mean nothing; embeddings are exact.

Rotary frequencies: ESM2 was trained in fp16, which rounded its ``inv_freq`` buffer, and
the published checkpoints (fair-esm's and the HF ones, per layer) carry the rounded values
(0.7500 instead of 0.7499, ...). Recomputing them shifts the rows measurably, so the
checkpoint's values are carried into ``rot_emb.inv_freq`` and only recomputed (from
``rope_theta``) when a file has none. Whatever runs the result must use that buffer.

Dropped on purpose: ``contact_head.*`` (fair-esm keeps contact regression in a separate
file the project never loads), ``pooler.*``, ``embeddings.position_ids`` (transformers
keeps ignoring ``position_embeddings.weight`` too). An ``EsmModel`` file has no LM head;
fair-esm's loader requires one, so it gets the tied embedding matrix and a neutral
dense/LayerNorm: logits of such a model mean nothing, embeddings are exact.

The files themselves (safetensors, ``pytorch_model.bin``, shards, hub ids in the local
HF cache) are read by weights.py.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esm2_batch.errors import ModelError, name_some
from esm2_batch.models.rotary import rope_theta, rotary_inv_freq
from esm2_batch.models.weights import (
    compare_keys,
    find_weights_file,
    locate,
    looks_like_hub_id,
    read_hf_config,
    read_hf_weights,
    wrong_shape,
)

Tensor = torch.Tensor

ESM2_VOCAB_SIZE = 33
ESM2_LAYER_NORM_EPS = 1e-5

MODEL_TYPES: dict[str, int] = {"esm": 1022, "fast_esm": 2046}
"""config.json ``model_type`` of each supported layout -> residues of its training context
next to BOS and EOS: ESM2 was trained on 1,024 tokens, FastESM2_650 further on up to 2,048
(as Synthyra describes it). The config's ``max_position_embeddings`` says nothing here (it is
1026 in ESM2's files and FastPLMs' default alike, and rotary positions have no table)."""
FASTESM_MODEL_TYPE = "fast_esm"

# HF name (after the optional "esm." prefix) of each per-layer fair-esm parameter.
_LAYER_MAP: dict[str, str] = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_INV_FREQ = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.self\.rotary_embeddings\.inv_freq$")
_MODEL_INV_FREQ = "rotary_embeddings.inv_freq"
_LM_HEAD_MAP: dict[str, str] = {
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
_IGNORED = re.compile(
    r"^(contact_head\.regression\.(weight|bias)|pooler\.dense\.(weight|bias)"
    r"|embeddings\.position_ids|embeddings\.position_embeddings\.weight)$"
)
"""Body keys with no place in a rotary ESM2 embedder (transformers skips the last one too)."""
_DECODER_KEYS = frozenset({"lm_head.decoder.weight", "lm_head.decoder.bias"})
"""Dropped: fair-esm's decoder IS the token embedding matrix (one tied parameter), so a
stored decoder would overwrite the embeddings when it differs (FastESM saves an untied
one); ``lm_head.decoder.bias`` repeats lm_head.bias in some saves."""
_TRANSFORMERS_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^encoder\.layer\.\*\.attention\.self\.rotary_embeddings\.inv_freq$"),
     _MODEL_INV_FREQ),
    (re.compile(r"(^|\.)LayerNorm\.gamma$"), r"\1LayerNorm.weight"),
    (re.compile(r"(^|\.)LayerNorm\.beta$"), r"\1LayerNorm.bias"),
)
"""transformers' load-time renames for model_type "esm" (conversion_mapping.py: "esm" and
the "legacy" entries it appends), applied after the optional "esm." prefix. Its
save_pretrained writes the left-hand names: the shared rotary buffer under a literal "*"."""


def read_hf_esm2(path_or_hub_id: str | os.PathLike[str]) -> dict[str, Any]:
    """An HF-layout ESM2 (folder, file in it, or cached hub id) in fair-esm's checkpoint layout.

    Returns ``{"model": {official name: tensor}, "cfg": {"model": Namespace(...)}}``, what
    ``esm.pretrained.load_model_and_alphabet_core`` (and `fair_esm.build_module`) consume.
    """
    folder = resolve_hf_folder(path_or_hub_id)
    config = read_hf_config(folder)
    dims = _esm2_dims(config, folder)
    state = read_hf_weights(folder)
    return {"model": _to_official(state, dims, folder), "cfg": {"model": dims.namespace()}}


def is_hf_esm2_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder holding an HF ESM2 (config model_type "esm" plus weights).

    Never raises: it is meant for choosing a backend from what ``--model_path`` points at.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir() or find_weights_file(folder) is None:
        return False
    try:
        return read_hf_config(folder).get("model_type") in MODEL_TYPES
    except ModelError:
        return False


def hf_model_type(path_or_hub_id: str | os.PathLike[str]) -> str:
    """The config.json ``model_type`` of an HF ESM2 (folder, file in it, or cached hub id):
    one of `MODEL_TYPES`, else a one-line ModelError."""
    folder = resolve_hf_folder(path_or_hub_id)
    model_type = read_hf_config(folder).get("model_type", "esm")
    if model_type not in MODEL_TYPES:
        raise ModelError(f"cannot load {folder}: not an ESM2 model (model_type is "
                         f"{model_type!r}, expected one of {', '.join(MODEL_TYPES)})")
    return str(model_type)


def hf_max_residues(path_or_hub_id: str | os.PathLike[str]) -> int:
    """Residues that fit the model's training context next to BOS and EOS (`MODEL_TYPES`):
    1,022 for ESM2, 2,046 for FastESM2."""
    return MODEL_TYPES[hf_model_type(path_or_hub_id)]


def resolve_hf_folder(path_or_hub_id: str | os.PathLike[str]) -> Path:
    """The model folder behind a folder, a weights/config file inside one, or a hub id."""
    found = locate(path_or_hub_id)
    if found is None:
        path = Path(path_or_hub_id).expanduser()
        raise ModelError(f"Hugging Face model not found: {path} is neither a folder nor a "
                         f"hub id like facebook/esm2_t33_650M_UR50D")
    return found.parent if found.is_file() else found


def hf_model_name(path_or_hub_id: str | os.PathLike[str]) -> str:
    """A readable model name: the hub id's name, the cache entry's, else the folder's."""
    text = str(path_or_hub_id)
    if looks_like_hub_id(text):
        return text.split("/", 1)[1]
    folder = Path(text).expanduser()
    folder = folder.parent if folder.is_file() else folder
    for part in (folder, *folder.parents):
        if part.name.startswith("models--"):
            return part.name.split("--")[-1]
    return folder.resolve().name


@dataclass(frozen=True, slots=True)
class _Dims:
    """The architecture facts fair-esm needs, read from an ESM2 ``config.json``."""

    layers: int
    embed_dim: int
    heads: int
    token_dropout: bool
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    def namespace(self) -> argparse.Namespace:
        """fairseq's ``cfg["model"]``, as in the official files."""
        return argparse.Namespace(
            encoder_layers=self.layers, encoder_embed_dim=self.embed_dim,
            encoder_attention_heads=self.heads, token_dropout=self.token_dropout)

    def default_inv_freq(self) -> Tensor:
        """Unrounded rotary frequencies (fair-esm's formula), only for files without any."""
        return rotary_inv_freq(self.head_dim, self.rope_theta)  # (D/2,)


def _esm2_dims(config: Mapping[str, Any], folder: Path) -> _Dims:
    """Check that `config` describes an ESM2 fair-esm can build, and read its shape."""
    def refuse(why: str) -> ModelError:
        return ModelError(f"cannot load {folder}: not an ESM2 model ({why}); "
                          f"ESM-1b/1v and ESMFold checkpoints are not supported")

    if config.get("model_type", "esm") not in MODEL_TYPES:
        expected = " or ".join(repr(name) for name in MODEL_TYPES)
        raise refuse(f"model_type is {config.get('model_type')!r}, expected {expected}")
    try:
        layers, embed = int(config["num_hidden_layers"]), int(config["hidden_size"])
        heads, ffn = int(config["num_attention_heads"]), int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        raise refuse("config.json lacks num_hidden_layers/hidden_size/num_attention_heads/"
                     "intermediate_size") from None
    checks = (
        (config.get("position_embedding_type") == "rotary", "position embeddings not rotary"),
        (not config.get("emb_layer_norm_before"), "emb_layer_norm_before is set"),
        (not config.get("is_folding_model"), "an ESMFold model"),
        (int(config.get("vocab_size", ESM2_VOCAB_SIZE)) == ESM2_VOCAB_SIZE, "vocab_size is not 33"),
        (ffn == 4 * embed, "intermediate_size is not 4 x hidden_size"),
        (heads > 0 and embed % heads == 0, "hidden_size is not a multiple of the heads"),
        (abs(float(config.get("layer_norm_eps", ESM2_LAYER_NORM_EPS)) - ESM2_LAYER_NORM_EPS)
         < 1e-9, "layer_norm_eps is not 1e-5"),
    )
    for ok, why in checks:
        if not ok:
            raise refuse(why)
    return _Dims(layers, embed, heads, bool(config.get("token_dropout", True)), rope_theta(config))


def _to_official(state: Mapping[str, Tensor], dims: _Dims, folder: Path) -> dict[str, Tensor]:
    """Rename HF keys to fair-esm's; strict: unknown keys, missing keys and shapes fail."""
    prefix = "esm." if any(key.startswith("esm.") for key in state) else ""
    body: dict[str, Tensor] = {}
    unknown: list[str] = []
    source: dict[str, str] = {}  # fair-esm name -> the stored key it came from
    shared_inv_freq: Tensor | None = None
    for key, value in state.items():
        name = _official_name(key, prefix)
        if name is None:
            unknown.append(key)
            continue
        if name and name in source:
            raise ModelError(f"cannot load {folder}: {key} and {source[name]} are the same "
                             f"weight stored twice")
        if name:
            source[name] = key
        if name == _MODEL_INV_FREQ:
            shared_inv_freq = value
        elif name:
            body[name] = value.float() if name.endswith(".inv_freq") else value
    if unknown:
        raise ModelError(f"cannot load {folder}: unexpected weights for an ESM2 "
                         f"({name_some(unknown)})")
    _fill_rotary(body, shared_inv_freq, dims)
    _fill_lm_head(body)
    _check_complete(body, dims, folder)
    return {_official_key(name): value for name, value in body.items()}


def _official_name(key: str, prefix: str) -> str | None:
    """fair-esm's module-level name for an HF key: "" to drop it, `_MODEL_INV_FREQ` for the
    model-level rotary buffer, None when the key is not part of an ESM2."""
    if key in _LM_HEAD_MAP:
        return _LM_HEAD_MAP[key]
    if key in _DECODER_KEYS:
        return ""
    if not key.startswith(prefix):
        return None
    rest = _transformers_name(key[len(prefix):])
    if _IGNORED.match(rest):
        return ""
    if rest == "embeddings.word_embeddings.weight":
        return "embed_tokens.weight"
    if rest.startswith("encoder.emb_layer_norm_after."):
        return rest.removeprefix("encoder.")
    if rest == _MODEL_INV_FREQ:
        return _MODEL_INV_FREQ
    if found := _LAYER_INV_FREQ.match(rest):
        return f"layers.{found.group(1)}.self_attn.rot_emb.inv_freq"
    found = _LAYER_KEY.match(rest)
    if found and found.group(2) in _LAYER_MAP:
        return f"layers.{found.group(1)}.{_LAYER_MAP[found.group(2)]}.{found.group(3)}"
    return None


def _transformers_name(key: str) -> str:
    """`key` (after the "esm." prefix) as transformers loads it (`_TRANSFORMERS_RENAMES`)."""
    for pattern, replacement in _TRANSFORMERS_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _fill_rotary(body: dict[str, Tensor], shared: Tensor | None, dims: _Dims) -> None:
    """Each layer's rot_emb.inv_freq: its own stored value, else the model-level one, else
    recomputed. Stored values are kept exactly (as float32), rounding included."""
    fallback = dims.default_inv_freq() if shared is None else shared.float()
    for layer in range(dims.layers):
        body.setdefault(f"layers.{layer}.self_attn.rot_emb.inv_freq", fallback)


def _fill_lm_head(body: dict[str, Tensor]) -> None:
    """fair-esm requires an LM head; an EsmModel file has none: tie the decoder to the token
    embeddings (as fair-esm does) and make the rest neutral. Embeddings never use it."""
    embed = body.get("embed_tokens.weight")
    if embed is None:
        return  # reported as missing by _check_complete
    vocab, dim = embed.shape
    neutral = {
        "lm_head.weight": embed,
        "lm_head.bias": torch.zeros(vocab, dtype=embed.dtype),
        "lm_head.dense.weight": torch.eye(dim, dtype=embed.dtype),
        "lm_head.dense.bias": torch.zeros(dim, dtype=embed.dtype),
        "lm_head.layer_norm.weight": torch.ones(dim, dtype=embed.dtype),
        "lm_head.layer_norm.bias": torch.zeros(dim, dtype=embed.dtype),
    }
    for name, value in neutral.items():
        body.setdefault(name, value)


def _expected_shapes(dims: _Dims) -> dict[str, tuple[int, ...]]:
    """Every fair-esm ESM2 parameter (contact regression aside) and its shape."""
    e, ffn = dims.embed_dim, 4 * dims.embed_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (ESM2_VOCAB_SIZE, e)}
    for layer in range(dims.layers):
        at = f"layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{at}self_attn.{proj}.weight": (e, e),
                           f"{at}self_attn.{proj}.bias": (e,)})
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes.update({f"{at}{norm}.weight": (e,), f"{at}{norm}.bias": (e,)})
        shapes.update({f"{at}fc1.weight": (ffn, e), f"{at}fc1.bias": (ffn,),
                       f"{at}fc2.weight": (e, ffn), f"{at}fc2.bias": (e,),
                       f"{at}self_attn.rot_emb.inv_freq": (dims.head_dim // 2,)})
    shapes.update({"emb_layer_norm_after.weight": (e,), "emb_layer_norm_after.bias": (e,),
                   "lm_head.weight": (ESM2_VOCAB_SIZE, e), "lm_head.bias": (ESM2_VOCAB_SIZE,),
                   "lm_head.dense.weight": (e, e), "lm_head.dense.bias": (e,),
                   "lm_head.layer_norm.weight": (e,), "lm_head.layer_norm.bias": (e,)})
    return shapes


def _check_complete(body: Mapping[str, Tensor], dims: _Dims, folder: Path) -> None:
    """Same keys and shapes as the ESM2 config.json describes, or one-line errors."""
    expected = _expected_shapes(dims)
    missing, extra = compare_keys(body, expected)
    if missing or extra:
        what = (f"missing {name_some(missing)}" if missing
                else f"weights beyond config.json ({name_some(extra)})")
        raise ModelError(f"cannot load {folder}: {what} for the {dims.layers}-layer ESM2 "
                         f"that config.json describes")
    if found := wrong_shape(body, expected):
        name, shape, implied = found
        raise ModelError(f"cannot load {folder}: {name} has shape {shape}, "
                         f"config.json implies {implied}")


def _official_key(name: str) -> str:
    """fairseq's prefix: the LM head sits under encoder., the rest under the sentence encoder."""
    return f"encoder.{name}" if name.startswith("lm_head.") else f"encoder.sentence_encoder.{name}"
