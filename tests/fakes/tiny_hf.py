"""Tiny random models in the Hugging Face layouts (ESM2, ESM C) and ESM C's original layout.

No weights can be downloaded here, so the tests write small random models exactly as the
published files are laid out and run the real loaders on them. The names are written from
the references, not from the code under test: transformers' ``convert_esm.py`` and
``EsmForMaskedLM`` for ESM2, the reference ``esm`` package's state dict and transformers'
``EsmcForMaskedLM`` for ESM C. Files are written with a hand-written safetensors writer, so
these fakes need no optional package (the tests check it against the real one).

Random values everywhere, LayerNorms included (their default init is 1 and 0, which would
hide a swapped norm), so a wrong mapping changes the outputs.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Literal

import torch
from esm.model.esm2 import ESM2
from torch import nn

Tensor = torch.Tensor
WeightsFormat = Literal["safetensors", "bin", "sharded"]
InvFreqPlacement = Literal["per_layer", "model", "none"]

_SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def write_safetensors(path: str | Path, tensors: dict[str, Tensor]) -> Path:
    """Write `tensors` in the safetensors format: u64-LE header size, JSON header (padded
    with spaces to 8 bytes, as the reference writer does), then the raw bytes in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        data = _raw_bytes(tensor)
        header[name] = {"dtype": _SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))
    return path


def _raw_bytes(tensor: Tensor) -> bytes:
    """The tensor's little-endian bytes (any dtype, bf16 included)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def write_weights(folder: Path, state: dict[str, Tensor], weights: WeightsFormat) -> None:
    """`state` as model.safetensors, pytorch_model.bin, or two safetensors shards + index."""
    if weights == "safetensors":
        write_safetensors(folder / "model.safetensors", state)
    elif weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        names = list(state)
        halves = (names[: len(names) // 2], names[len(names) // 2:])
        weight_map: dict[str, str] = {}
        for number, part in enumerate(halves, start=1):
            shard = f"model-0000{number}-of-00002.safetensors"
            write_safetensors(folder / shard, {name: state[name] for name in part})
            weight_map.update(dict.fromkeys(part, shard))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def add_to_hf_cache(
    cache: Path, hub_id: str, folder: Path, *, commit: str = "0123456789abcdef" * 2 + "01234567",
    ref: str = "main",
) -> Path:
    """Place `folder`'s files in an HF hub cache as huggingface_hub does (blobs, snapshot
    symlinks, refs/<ref>) and return the snapshot folder."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


# --------------------------------------------------------------------------------------
# Random values
# --------------------------------------------------------------------------------------


def randomize_norms(module: nn.Module, *, seed: int = 1) -> nn.Module:
    """Give every LayerNorm random weights (around 1) and biases (around 0), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=generator))
                if norm.bias is not None:
                    norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=generator))
    return module


def round_inv_freq(module: ESM2) -> ESM2:
    """Round every layer's rotary inv_freq through fp16, as the published ESM2 checkpoints
    carry it (ESM2 was trained in fp16: 0.7500 instead of 0.7499, ...), in place."""
    for layer in module.layers:
        rot = layer.self_attn.rot_emb
        rot.inv_freq.copy_(rot.inv_freq.half().float())
    return module


# --------------------------------------------------------------------------------------
# ESM2 in the Hugging Face layout
# --------------------------------------------------------------------------------------


def hf_esm2_config(module: ESM2) -> dict[str, object]:
    """The config.json transformers' convert_esm.py writes for an ESM2."""
    return {
        "architectures": ["EsmForMaskedLM"], "model_type": "esm",
        "vocab_size": module.alphabet_size, "hidden_size": module.embed_dim,
        "num_hidden_layers": module.num_layers, "num_attention_heads": module.attention_heads,
        "intermediate_size": 4 * module.embed_dim, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 1026, "layer_norm_eps": 1e-5,
        "position_embedding_type": "rotary", "token_dropout": module.token_dropout,
        "emb_layer_norm_before": False, "pad_token_id": module.padding_idx,
        "mask_token_id": module.mask_idx, "is_folding_model": False, "use_cache": True,
    }


def hf_esm2_state(
    module: ESM2, *, prefix: str = "esm.", lm_head: bool = True,
    inv_freq: InvFreqPlacement = "per_layer",
) -> dict[str, Tensor]:
    """`module`'s weights under transformers' names (convert_esm.py). ``prefix=""`` is an
    EsmModel saved directly (no LM head, a pooler); `inv_freq` places the rotary buffers
    per layer (transformers < 5 and the hub files), once per model (>= 5), or nowhere."""
    src = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out = {f"{prefix}embeddings.word_embeddings.weight": src["embed_tokens.weight"]}
    for i in range(module.num_layers):
        out.update(_hf_esm2_layer(src, i, prefix, per_layer_inv_freq=inv_freq == "per_layer"))
    for part in ("weight", "bias"):
        out[f"{prefix}encoder.emb_layer_norm_after.{part}"] = src[f"emb_layer_norm_after.{part}"]
        out[f"{prefix}contact_head.regression.{part}"] = src[f"contact_head.regression.{part}"]
    if inv_freq == "per_layer":
        out[f"{prefix}embeddings.position_ids"] = torch.arange(1026).expand(1, -1).clone()
    if inv_freq == "model":
        out[f"{prefix}rotary_embeddings.inv_freq"] = src["layers.0.self_attn.rot_emb.inv_freq"]
    if lm_head:
        out.update({
            "lm_head.dense.weight": src["lm_head.dense.weight"],
            "lm_head.dense.bias": src["lm_head.dense.bias"],
            "lm_head.layer_norm.weight": src["lm_head.layer_norm.weight"],
            "lm_head.layer_norm.bias": src["lm_head.layer_norm.bias"],
            "lm_head.decoder.weight": src["lm_head.weight"],
            "lm_head.bias": src["lm_head.bias"],
        })
    if not prefix:
        generator = torch.Generator().manual_seed(3)
        e = module.embed_dim
        out["pooler.dense.weight"] = torch.randn(e, e, generator=generator)
        out["pooler.dense.bias"] = torch.randn(e, generator=generator)
    return out


def _hf_esm2_layer(
    src: dict[str, Tensor], i: int, prefix: str, *, per_layer_inv_freq: bool
) -> dict[str, Tensor]:
    """One encoder layer under transformers' names."""
    to, at = f"{prefix}encoder.layer.{i}.", f"layers.{i}."
    names = {
        "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
        "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
        "attention.LayerNorm": "self_attn_layer_norm", "intermediate.dense": "fc1",
        "output.dense": "fc2", "LayerNorm": "final_layer_norm",
    }
    out = {f"{to}{hf}.{part}": src[f"{at}{fair}.{part}"]
           for hf, fair in names.items() for part in ("weight", "bias")}
    if per_layer_inv_freq:
        rotary = src[f"{at}self_attn.rot_emb.inv_freq"]
        out[f"{to}attention.self.rotary_embeddings.inv_freq"] = rotary
    return out


def write_hf_esm2(
    folder: str | Path, module: ESM2, *, weights: WeightsFormat = "safetensors",
    prefix: str = "esm.", lm_head: bool = True, inv_freq: InvFreqPlacement = "per_layer",
    extra: dict[str, Tensor] | None = None, config: dict[str, object] | None = None,
) -> Path:
    """Write `module` as a Hugging Face ESM2 folder (config.json + weights); `extra` adds
    tensors, `config` overrides config.json fields."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_esm2_state(module, prefix=prefix, lm_head=lm_head, inv_freq=inv_freq)
    state.update(extra or {})
    (folder / "config.json").write_text(json.dumps({**hf_esm2_config(module), **(config or {})}))
    write_weights(folder, state, weights)
    return folder


# --------------------------------------------------------------------------------------
# ESM C in both layouts
# --------------------------------------------------------------------------------------


def esmc_ffn_hidden(d_model: int) -> int:
    """8/3 d rounded up to a multiple of 256, as the reference's swiglu_correction_fn."""
    return int(((8 / 3) * d_model + 255) // 256 * 256)


def random_esmc_state(
    *, d_model: int = 128, n_layers: int = 2, vocab: int = 64, seed: int = 0,
) -> dict[str, Tensor]:
    """A random ESM C in the original layout (the reference's ESMC.state_dict() names, the
    sequence head included, as in data/weights/esmc_*.pth)."""
    generator = torch.Generator().manual_seed(seed)
    h = esmc_ffn_hidden(d_model)

    def linear(rows: int, cols: int) -> Tensor:
        return torch.randn(rows, cols, generator=generator) / math.sqrt(cols)

    def norm(*, bias: bool = True) -> dict[str, Tensor]:
        out = {"weight": 1 + 0.2 * torch.randn(d_model, generator=generator)}
        if bias:
            out["bias"] = 0.1 * torch.randn(d_model, generator=generator)
        return out

    state = {"embed.weight": torch.randn(vocab, d_model, generator=generator)}
    for i in range(n_layers):
        at = f"transformer.blocks.{i}."
        state.update({f"{at}attn.layernorm_qkv.0.{k}": v for k, v in norm().items()})
        state[f"{at}attn.layernorm_qkv.1.weight"] = linear(3 * d_model, d_model)
        state[f"{at}attn.out_proj.weight"] = linear(d_model, d_model)
        state[f"{at}attn.q_ln.weight"] = norm(bias=False)["weight"]
        state[f"{at}attn.k_ln.weight"] = norm(bias=False)["weight"]
        state.update({f"{at}ffn.0.{k}": v for k, v in norm().items()})
        state[f"{at}ffn.1.weight"] = linear(2 * h, d_model)
        state[f"{at}ffn.3.weight"] = linear(d_model, h)
    state["transformer.norm.weight"] = norm(bias=False)["weight"]
    state.update({
        "sequence_head.0.weight": linear(d_model, d_model),
        "sequence_head.0.bias": torch.zeros(d_model),
        "sequence_head.2.weight": torch.ones(d_model),
        "sequence_head.2.bias": torch.zeros(d_model),
        "sequence_head.3.weight": linear(vocab, d_model),
        "sequence_head.3.bias": torch.zeros(vocab),
    })
    return state


def esmc_hf_state(
    original: dict[str, Tensor], *, prefix: str = "esmc.", lm_head: bool = True,
) -> dict[str, Tensor]:
    """The same weights under transformers' EsmcForMaskedLM names: q/k/v and gate/up split
    out of the fused original matrices (gate is the first half: silu applies to it)."""
    n_layers = len({k.split(".")[2] for k in original if k.startswith("transformer.blocks.")})
    out = {f"{prefix}embed_tokens.weight": original["embed.weight"],
           f"{prefix}norm.weight": original["transformer.norm.weight"]}
    for i in range(n_layers):
        at, to = f"transformer.blocks.{i}.", f"{prefix}layers.{i}."
        q, k, v = original[f"{at}attn.layernorm_qkv.1.weight"].chunk(3)
        gate, up = original[f"{at}ffn.1.weight"].chunk(2)
        out.update({
            f"{to}input_layernorm.weight": original[f"{at}attn.layernorm_qkv.0.weight"],
            f"{to}input_layernorm.bias": original[f"{at}attn.layernorm_qkv.0.bias"],
            f"{to}self_attn.q_proj.weight": q.clone(), f"{to}self_attn.k_proj.weight": k.clone(),
            f"{to}self_attn.v_proj.weight": v.clone(),
            f"{to}self_attn.o_proj.weight": original[f"{at}attn.out_proj.weight"],
            f"{to}self_attn.q_norm.weight": original[f"{at}attn.q_ln.weight"],
            f"{to}self_attn.k_norm.weight": original[f"{at}attn.k_ln.weight"],
            f"{to}post_attention_layernorm.weight": original[f"{at}ffn.0.weight"],
            f"{to}post_attention_layernorm.bias": original[f"{at}ffn.0.bias"],
            f"{to}mlp.gate_proj.weight": gate.clone(), f"{to}mlp.up_proj.weight": up.clone(),
            f"{to}mlp.down_proj.weight": original[f"{at}ffn.3.weight"],
        })
    if lm_head:
        out.update({
            "lm_head.dense.weight": original["sequence_head.0.weight"],
            "lm_head.dense.bias": original["sequence_head.0.bias"],
            "lm_head.layer_norm.weight": original["sequence_head.2.weight"],
            "lm_head.layer_norm.bias": original["sequence_head.2.bias"],
            "lm_head.decoder.weight": original["sequence_head.3.weight"],
            "lm_head.decoder.bias": original["sequence_head.3.bias"],
        })
    return out


def hf_esmc_config(original: dict[str, Tensor], *, n_heads: int) -> dict[str, object]:
    """An EsmcConfig config.json for `original`'s shapes."""
    vocab, d_model = original["embed.weight"].shape
    n_layers = len({k.split(".")[2] for k in original if k.startswith("transformer.blocks.")})
    return {
        "architectures": ["EsmcForMaskedLM"], "model_type": "esmc", "vocab_size": vocab,
        "hidden_size": d_model, "intermediate_size": esmc_ffn_hidden(d_model),
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_heads, "head_dim": d_model // n_heads,
        "hidden_act": "silu", "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "mask_token_id": 32,
    }


def write_esmc_pth(path: str | Path, original: dict[str, Tensor]) -> Path:
    """The original layout as the reference ships it: a torch-saved plain state dict."""
    path = Path(path)
    torch.save(original, path)
    return path


def write_hf_esmc(
    folder: str | Path, original: dict[str, Tensor], *, n_heads: int,
    weights: WeightsFormat = "safetensors", prefix: str = "esmc.", lm_head: bool = True,
    extra: dict[str, Tensor] | None = None, config: dict[str, object] | None = None,
) -> Path:
    """Write `original` as a Hugging Face ESM C folder (config.json + weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = esmc_hf_state(original, prefix=prefix, lm_head=lm_head)
    state.update(extra or {})
    settings = {**hf_esmc_config(original, n_heads=n_heads), **(config or {})}
    (folder / "config.json").write_text(json.dumps(settings))
    write_weights(folder, state, weights)
    return folder
