"""A whole run with an outdated name in the list: meta and summary say what was matched."""

from __future__ import annotations

from pathlib import Path

import torch

from esm2_batch.models import LoadedModel
from esm2_batch.run.gene_mode import run
from tests.fakes.ensembl import FakeEnsembl, renamed, synthetic_genes
from tests.run.flat import make_config


def test_run_records_the_current_symbol_of_a_synonym(tmp_path: Path,
                                                     model: LoadedModel) -> None:
    genes = renamed(synthetic_genes(4, coding=2, nmd=0), {"GENE0002": "NEW0002"})
    hvg = tmp_path / "hvg.txt"
    hvg.write_text("GENE0001\nGENE0002\n7-Sep\n")
    fake = FakeEnsembl(genes)
    with fake.running_in_thread() as url:
        summary = run(make_config(hvg_file=hvg, out=tmp_path / "esm_all.pt", ensembl_url=url,
                                  rate_limit=1000.0, progress=False, toks_per_batch=2048),
                      model=model)
    meta = torch.load(tmp_path / "esm_all.pt", weights_only=True)["meta"]
    assert meta["synonyms"] == {"GENE0002": "NEW0002"}
    assert meta["symbols"]["GENE0002"] == "NEW0002"
    assert meta["gene_ids"]["GENE0002"] == "ENSG00900000002"
    assert meta["status"]["GENE0002"] == "ok"
    assert any(n.startswith("found under a newer name: 1 (GENE0002 -> NEW0002)")
               for n in summary.notes)
    assert summary.not_found == ["7-Sep"] and fake.counts["xrefs"] == 1  # GENE0002 only
