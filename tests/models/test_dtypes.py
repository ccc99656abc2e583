"""The half-precision (CUDA) code paths, run on CPU where torch allows it: the fast engine
in float16 and bfloat16 against float32 on the same tiny random ESM2, at ESM2's longest
context (1,022 residues), dtype selection ("auto" and the names), and --dtype on the CLI
down to meta["compute_dtype"]."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from esm.model.esm2 import ESM2
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.embedding.embed import embed_sequences
from esm2_batch.errors import ModelError
from esm2_batch.models import DTYPES, LoadedModel, esm2_from_module, load_model, resolve_dtype
from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.sources.isoforms_fasta import write_isoforms_fasta
from tests.fakes.tiny_esm import build_random_esm2
from tests.tolerance import low_precision_tolerance

AMINO = "ACDEFGHIKLMNPQRSTVWY"
LAYERS, EMBED, HEADS = 4, 96, 4  # head_dim 24, as in ESM2-35M
LOW = [torch.float16, torch.bfloat16]
LENGTHS = (7, 38, 120, 301, 1022)  # the last one fills ESM2's context (1,024 tokens)


@pytest.fixture(scope="module")
def module() -> ESM2:
    return build_random_esm2(num_layers=LAYERS, embed_dim=EMBED, heads=HEADS, seed=3).eval()


def engine(module: ESM2, dtype: torch.dtype | str) -> LoadedModel:
    """The fast engine on a copy of `module` (preparing casts the module in place)."""
    return esm2_from_module(copy.deepcopy(module), module.alphabet, name="esm2_tiny",
                            device="cpu", dtype=dtype)


def batch(module: ESM2) -> torch.Tensor:
    sequences = ["".join(random.Random(n).choices(AMINO, k=n)) for n in LENGTHS]
    _, _, tokens = module.alphabet.get_batch_converter()(
        [(str(i), s) for i, s in enumerate(sequences)])
    assert tokens.shape[1] == 1024
    return tokens


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fast_engine_in_half_precision_close_to_fp32_at_1022_residues(
    module: ESM2, dtype: torch.dtype
) -> None:
    tokens = batch(module)
    real = (tokens != module.padding_idx).unsqueeze(-1)  # (B, T, 1)
    full, low = engine(module, "fp32"), engine(module, dtype)
    assert low.dtype == dtype and low.fast is not None
    assert low.fast.inv_freq.dtype == torch.float32  # rotary tables stay fp32
    for layer in (1, LAYERS):  # each call runs layers 1..layer again: first and last
        want = full.encoder(tokens, layer=layer)
        got = low.encoder(tokens, layer=layer)
        assert got.dtype == dtype
        assert bool(torch.isfinite(got).all()), layer  # no overflow at 1,024 tokens
        magnitude = float(want.abs().max())
        limit = low_precision_tolerance(dtype, depth=layer, magnitude=magnitude)
        diff = (got.float() - want).masked_fill(~real, 0.0).abs()
        assert float(diff.max()) <= limit, (layer, float(diff.max()), limit)
        assert float(diff[-1].max()) <= limit  # the 1,022-residue row on its own
        assert not got.masked_select(~real).any()  # padding comes back as zeros


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_half_precision_rows_through_the_embedder(module: ESM2, dtype: torch.dtype) -> None:
    sequences = ["".join(random.Random(n).choices(AMINO, k=n)) for n in (*LENGTHS, 1500)]
    want = embed_sequences(engine(module, "fp32"), sequences)
    got = embed_sequences(engine(module, dtype), sequences)
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    # a mean over residues is no worse than its worst element
    limit = low_precision_tolerance(dtype, depth=LAYERS, magnitude=float(want.abs().max()))
    assert float((got - want).abs().max()) <= limit
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert float(cosine.min()) > 0.99


def test_rotary_positions_above_256_stay_exact_in_fp16(module: ESM2) -> None:
    """fp16 tables would round positions above 256 (one ulp of 512 is 0.5): the engine's
    fp16 states at position 700 must be as close to fp32 as those at position 10."""
    tokens = batch(module)[-1:]  # the 1,022-residue row alone
    want = engine(module, "fp32").encoder(tokens, layer=1)
    got = engine(module, torch.float16).encoder(tokens, layer=1).float()
    limit = low_precision_tolerance(torch.float16, depth=1,
                                    magnitude=float(want.abs().max()))
    assert float((got - want)[0, 600:1023].abs().max()) <= limit


def test_auto_picks_fp16_on_cuda_and_fp32_elsewhere() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for auto in (None, "auto", "AUTO", " auto "):
        assert resolve_dtype(auto, cpu) == torch.float32
        assert resolve_dtype(auto, cuda) == torch.float16
    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "float16": torch.float16, "torch.bfloat16": torch.bfloat16, "half": torch.float16}
    for name, want in names.items():
        assert resolve_dtype(name, cpu) == want == resolve_dtype(want, cuda)
    assert DTYPES == ("auto", "fp16", "bf16", "fp32")


@pytest.mark.parametrize("bad", ["fp8", "int8", "float64", "", torch.int32])
def test_bad_dtype_is_one_line_model_error(checkpoint: Path, bad: str | torch.dtype) -> None:
    with pytest.raises(ModelError, match="unsupported dtype") as info:
        load_model(checkpoint, dtype=bad)
    assert "\n" not in str(info.value) and "auto, fp16, bf16 or fp32" in str(info.value)


def test_load_model_dtype_auto_and_named(checkpoint: Path) -> None:
    assert load_model(checkpoint, dtype="auto").dtype == torch.float32  # on this CPU
    bf16 = load_model(checkpoint, dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.fast is not None
    assert next(bf16.module.parameters()).dtype == torch.bfloat16
    assert bf16.fast.inv_freq.dtype == torch.float32


def test_unknown_engine_for_a_module_in_memory(module: ESM2) -> None:
    with pytest.raises(ModelError, match="unknown engine"):
        esm2_from_module(module, module.alphabet, name="x", engine="turbo")  # type: ignore[arg-type]


def _isoforms_fasta(path: Path) -> Path:
    genes = [GeneIsoforms(
        query=symbol, gene_id=f"ENSG0000000000{i}", symbol=symbol, status="ok",
        isoforms=(Isoform(f"ENSP0000000000{i}", f"ENST0000000000{i}", f"ENSG0000000000{i}",
                          "".join(random.Random(i).choices(AMINO, k=40 + 30 * i)), True,
                          "protein_coding"),))
        for i, symbol in enumerate(["BRAF", "TP53"])]
    write_isoforms_fasta(path, genes)
    return path


@pytest.mark.parametrize(("flag", "recorded"), [("bf16", "bfloat16"), ("auto", "float32")])
def test_cli_dtype_recorded_in_meta(tmp_path: Path, checkpoint: Path, flag: str,
                                    recorded: str) -> None:
    hvg = tmp_path / "genes.txt"
    hvg.write_text("BRAF\nTP53\n")
    out = tmp_path / "esm_all.pt"
    result = CliRunner().invoke(app, [
        "--hvg_file", str(hvg), "--isoforms", str(_isoforms_fasta(tmp_path / "iso.fa")),
        "--model_path", str(checkpoint), "--device", "cpu", "--dtype", flag, "--out", str(out),
        "-q"])
    assert result.exit_code == 0, result.output
    data = torch.load(out, weights_only=True)
    assert data["meta"]["compute_dtype"] == recorded and data["emb"].dtype == torch.float16
    assert bool(torch.isfinite(data["emb"]).all())


@pytest.mark.parametrize("command", [[], ["fasta", "x.fa"]])
def test_cli_bad_dtype_is_a_usage_error(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--dtype", "fp8"])
    assert result.exit_code == 2
    assert "--dtype" in result.output and "auto, fp16, bf16, fp32" in result.output
