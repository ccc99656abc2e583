"""--include per_tok: the residue store beside the pooled output, in FASTA and gene mode,
equal to fair-esm's representations[layer][i, 1:L+1], resumed from the last shard."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from esm2_batch.cli import app
from esm2_batch.embedding.embed import Embedded, embed_rows
from esm2_batch.embedding.options import EmbedOptions, LongSeqs
from esm2_batch.errors import StoreError
from esm2_batch.models import LoadedModel
from esm2_batch.run import fasta_mode, stages
from esm2_batch.run.fasta_mode import run_fasta
from esm2_batch.run.gene_mode import residues_path, run
from esm2_batch.run.stages import StageOptions
from esm2_batch.store.esm_file import read_esm_file
from esm2_batch.store.residues import INDEX_FILE, ResidueWriter, open_residues
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.fakes.tiny_esm import fair_esm_states
from tests.run.flat import make_config
from tests.tolerance import storage_tolerance, stored_tolerance, tolerance

SEQUENCES = {"a": "MKVLAAGIVGLLLAQ", "b": "MSTNPKPQRK", "c": "M", "d": "MKVLAAGIVGLLLAQ",
             "e": "ACDEFGHIKLMNPQRSTVWY" * 3}


@pytest.fixture
def fasta(tmp_path: Path) -> Path:
    path = tmp_path / "in.fa"
    path.write_text("".join(f">{label} x\n{seq}\n" for label, seq in SEQUENCES.items()))
    return path


@pytest.fixture(scope="module")
def fair_esm(checkpoint: Path) -> Callable[[str, int], torch.Tensor]:
    """fair-esm's own module: (seq, layer) -> representations[layer][0, 1:L+1]."""
    states = fair_esm_states(checkpoint)
    return lambda sequence, layer: states(sequence, layer)[1 : len(sequence) + 1]

    return states


def test_fasta_per_tok_equals_fair_esm(tmp_path: Path, fasta: Path, model: LoadedModel,
                                       fair_esm: Callable[[str, int], torch.Tensor]) -> None:
    run_fasta([fasta], model=model, embed=EmbedOptions(repr_layers=(1, -1), per_tok=True),
              out_dir=tmp_path, stage=StageOptions(progress=False))
    (tmp_path / "plain").mkdir()
    run_fasta([fasta], model=model, embed=EmbedOptions(repr_layers=(1, -1)),
              out_dir=tmp_path / "plain", stage=StageOptions(progress=False))
    pooled = torch.load(tmp_path / "in_ESM.pt", weights_only=True)
    plain = torch.load(tmp_path / "plain" / "in_ESM.pt", weights_only=True)
    assert pooled.keys() == plain.keys()  # per_tok leaves the pooled file as it was
    assert all(torch.equal(x, y) for x, y in zip(pooled["data"], plain["data"], strict=True))
    store = open_residues(tmp_path / "in_residues")
    assert store.layers == [1, 2] and sorted(store) == sorted(SEQUENCES)
    for label, sequence in SEQUENCES.items():
        for layer in (1, 2):
            want = fair_esm(sequence, layer)
            got = store.residues(label, layer)
            assert got.dtype == torch.float16 and got.shape == want.shape
            # fp32 compute (FFN-width reductions per layer), stored once in fp16
            bound = stored_tolerance(torch.float16, magnitude=float(want.abs().max()),
                                     terms=4 * model.embed_dim, depth=layer)
            assert (got.float() - want).abs().max() <= bound, (label, layer)


def test_fasta_resume_embeds_only_what_no_finished_shard_holds(
        tmp_path: Path, fasta: Path, model: LoadedModel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    small = functools.partial(ResidueWriter, shard_mb=0.001)  # ~one protein per shard
    monkeypatch.setattr(fasta_mode, "ResidueWriter", small)
    options = EmbedOptions(per_tok=True)
    run_fasta([fasta], model=model, embed=options, stage=StageOptions(progress=False))
    first = torch.load(tmp_path / "in_ESM.pt", weights_only=True)
    # a kill -9 after the last shard's rename, before its index: and no _ESM.pt yet
    store = tmp_path / "in_residues"
    index = json.loads((store / INDEX_FILE).read_text())
    last = index["shards"].pop()
    lost = sorted(p for p, e in index["proteins"].items() if e["shard"] == last)
    index["proteins"] = {p: e for p, e in index["proteins"].items() if e["shard"] != last}
    (store / INDEX_FILE).write_text(json.dumps(index))
    (tmp_path / "in_ESM.pt").unlink()
    embedded: list[str] = []
    real = embed_rows

    def spy(model: LoadedModel, sequences: list[tuple[str, str]], options: EmbedOptions
            ) -> Iterator[object]:
        embedded.extend(name for name, _ in sequences)
        return real(model, sequences, options)

    monkeypatch.setattr(stages, "embed_rows", spy)
    run_fasta([fasta], model=model, embed=options, stage=StageOptions(progress=False))
    assert lost and sorted(embedded) == lost  # the lost shard's proteins, no others
    again = torch.load(tmp_path / "in_ESM.pt", weights_only=True)
    assert again["proteins"] == first["proteins"]
    for label, x, y in zip(first["proteins"], again["data"], first["data"], strict=True):
        if label not in lost:  # read back from the finished shards, bit for bit
            assert torch.equal(x, y), label
        else:  # embedded again in another batch: another summation order
            bound = tolerance(torch.float32, terms=4 * model.embed_dim, depth=2,
                              magnitude=float(y.abs().max()))
            assert (x - y).abs().max() <= bound, label
    assert sorted(open_residues(store)) == sorted(SEQUENCES)


def test_fasta_refuses_another_models_store(tmp_path: Path, fasta: Path,
                                                    model: LoadedModel) -> None:
    ResidueWriter(tmp_path / "in_residues", {"model": "other"}, layers=[2], dim=32).close()
    with pytest.raises(StoreError, match="residue store made with other settings"):
        run_fasta([fasta], model=model, embed=EmbedOptions(per_tok=True))
    assert not (tmp_path / "in_ESM.pt").exists()


def test_cli_include_per_tok_alone(tmp_path: Path, fasta: Path, checkpoint: Path) -> None:
    result = CliRunner().invoke(app, ["fasta", str(fasta), "--model_path", str(checkpoint),
                                      "--device", "cpu", "--include", "per_tok", "-q"])
    assert result.exit_code == 0, result.output
    assert len(torch.load(tmp_path / "in_ESM.pt", weights_only=True)["data"]) == 5
    assert len(open_residues(tmp_path / "in_residues")) == 5


GENES = [braf(), *synthetic_genes(2, coding=2, nmd=0)]


def test_gene_mode_per_tok(tmp_path: Path, model: LoadedModel) -> None:
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(["BRAF", *(g.symbol for g in GENES[1:])]) + "\n")
    with FakeEnsembl(GENES).running_in_thread() as url:
        config = make_config(hvg_file=hvg, out=tmp_path / "esm_all.pt", ensembl_url=url,
                             rate_limit=1000.0, progress=False, per_tok=True)
        run(make_config(hvg_file=hvg, out=tmp_path / "plain.pt", ensembl_url=url,
                        rate_limit=1000.0, progress=False), model=model)
        run(config, model=model)
        with pytest.raises(StoreError, match="lacks the residue states"):  # reused rows
            run(make_config(hvg_file=hvg, out=tmp_path / "plain.pt", ensembl_url=url,
                            rate_limit=1000.0, progress=False, per_tok=True), model=model)
    data = read_esm_file(config.out)
    assert torch.equal(data.emb, read_esm_file(tmp_path / "plain.pt").emb)
    assert data.meta["residues"] == {"path": "esm_all.residues", "layers": [2]}
    store = open_residues(residues_path(config.out))
    assert sorted(store) == sorted(data.protein_ids)
    for n, protein in enumerate(data.protein_ids):  # the states' mean is the row
        states = store[protein].float()  # one forward made both: they differ by rounding
        bound = 2 * storage_tolerance(torch.float16, magnitude=float(states.abs().max()))
        assert (states.mean(0) - data.emb[n].float()).abs().max() <= bound, protein


@pytest.mark.parametrize("long_seqs", ["truncate", "window"])
def test_per_tok_states_are_per_residue_rows(model: LoadedModel, long_seqs: LongSeqs) -> None:
    """per_tok hands back what pooling="per_residue" returns (window mode: each residue
    averaged over its windows), beside unchanged pooled rows."""
    seqs = [("long", SEQUENCES["e"]), ("short", SEQUENCES["b"])]

    def rows(**flags: Any) -> dict[str, Embedded]:
        options = EmbedOptions(truncation=24, long_seqs=long_seqs, **flags)
        return {r.name: r for r in embed_rows(model, seqs, options)}

    got = rows(per_tok=True, repr_layers=(1, 2))
    for layer in (1, 2):
        states, means = rows(pooling="per_residue", repr_layer=layer), rows(repr_layer=layer)
        for name, _ in seqs:
            assert torch.equal(got[name].residues[layer - 1], states[name].rows[0])
            assert torch.equal(got[name].rows[layer - 1], means[name].rows[0])


def test_gene_mode_resumes_from_the_last_finished_shard(
        tmp_path: Path, model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows in the partial store but their shard lost: only those are embedded again."""
    from esm2_batch.run import gene_mode

    monkeypatch.setattr(gene_mode, "ResidueWriter",
                        functools.partial(ResidueWriter, shard_mb=0.001))
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("\n".join(["BRAF", *(g.symbol for g in GENES[1:])]) + "\n")

    def crash(self: object, stage: object) -> None:
        raise KeyboardInterrupt  # after embedding, before esm_all.pt

    with FakeEnsembl(GENES).running_in_thread() as url:
        config = make_config(hvg_file=hvg, out=tmp_path / "esm_all.pt", ensembl_url=url,
                             rate_limit=1000.0, progress=False, per_tok=True)
        with monkeypatch.context() as patch:
            patch.setattr(gene_mode.GeneRun, "_finish", crash)
            with pytest.raises(KeyboardInterrupt):
                run(config, model=model)
        store = residues_path(config.out)
        index = json.loads((store / INDEX_FILE).read_text())
        last = index["shards"].pop()
        lost = sorted(p for p, e in index["proteins"].items() if e["shard"] == last)
        index["proteins"] = {p: e for p, e in index["proteins"].items() if e["shard"] != last}
        (store / INDEX_FILE).write_text(json.dumps(index))
        embedded: list[str] = []

        def spy(model: LoadedModel, sequences: list[tuple[str, str]], options: EmbedOptions
                ) -> Iterator[Embedded]:
            embedded.extend(name for name, _ in sequences)
            return embed_rows(model, sequences, options)

        monkeypatch.setattr(stages, "embed_rows", spy)
        run(config, model=model)
    assert lost and sorted(embedded) == lost
    data = read_esm_file(config.out)
    assert sorted(open_residues(store)) == sorted(data.protein_ids)


def test_fasta_per_tok_fills_the_store_of_a_file_embedded_without_it(
        tmp_path: Path, fasta: Path, model: LoadedModel) -> None:
    quiet = StageOptions(progress=False)
    first = run_fasta([fasta], model=model, stage=quiet)
    again = run_fasta([fasta], model=model, embed=EmbedOptions(per_tok=True), stage=quiet)
    done = run_fasta([fasta], model=model, embed=EmbedOptions(per_tok=True), stage=quiet)
    assert not first[0].skipped and not again[0].skipped and done[0].skipped
    assert len(open_residues(tmp_path / "in_residues")) == len(SEQUENCES)
