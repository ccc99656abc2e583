"""The partial store and the esm_all.pt writer: nothing finished is lost, nothing torn
is trusted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esm2_batch.errors import StoreError
from esm2_batch.records import GeneIsoforms, Isoform
from esm2_batch.store.atomic import atomic_save
from esm2_batch.store.esm_file import assemble, read_esm_file, validate, write_esm_file
from esm2_batch.store.keys import RowKeys
from esm2_batch.store.partial import PartialStore

SETTINGS = {"model": "m", "layer": 2, "truncation": 1022}


def gene(query: str, *seqs: str) -> GeneIsoforms:
    isos = tuple(Isoform(f"P{query}{i}", f"T{i}", f"G{query}", s, i == 0, "protein_coding")
                 for i, s in enumerate(seqs))
    return GeneIsoforms(query, f"G{query}", query, isos, "ok" if seqs else "no_protein")


def test_torn_last_line_is_cut_and_appending_goes_on(tmp_path: Path) -> None:
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        store.append_genes([gene("A", "MK"), gene("B")])
    with open(tmp_path / "p" / "isoforms.jsonl", "a") as handle:
        handle.write('{"query": "C", "isof')  # killed mid-write
    with PartialStore(tmp_path / "p", SETTINGS) as again:
        assert list(again.cached_genes()) == ["A", "B"]
        again.append_genes([gene("C", "MV")])
    with PartialStore(tmp_path / "p", SETTINGS) as last:
        assert list(last.cached_genes()) == ["A", "B", "C"]


def test_rows_round_trip_and_chunks_continue_after_reopen(tmp_path: Path) -> None:
    with PartialStore(tmp_path / "p", SETTINGS) as store:
        store.add_rows(["k1", "k2"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with PartialStore(tmp_path / "p", SETTINGS) as reopened:
        reopened.add_rows(["k3"], torch.tensor([[5.0, 6.0]]))
        rows = reopened.load_rows()
    assert sorted(rows) == ["k1", "k2", "k3"] and rows["k3"].dtype == torch.float16
    assert sorted(p.name for p in (tmp_path / "p" / "rows").iterdir()) == ["000000.pt",
                                                                         "000001.pt"]


def test_other_settings_refused_then_overwritten(tmp_path: Path) -> None:
    PartialStore(tmp_path / "p", SETTINGS).add_rows(["k"], torch.zeros(1, 2))
    with pytest.raises(StoreError, match="layer: 2 then, 3 now"):
        PartialStore(tmp_path / "p", {**SETTINGS, "layer": 3})
    fresh = PartialStore(tmp_path / "p", {**SETTINGS, "layer": 3}, overwrite=True)
    assert fresh.load_rows() == {}


def test_a_failed_save_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "esm_all.pt"
    torch.save({"old": 1}, target)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises
        atomic_save({"bad": lambda: None}, target)
    assert torch.load(target, weights_only=True) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["esm_all.pt"]


def test_assemble_orders_rows_and_reuses_an_earlier_file(tmp_path: Path) -> None:
    records = {"A": gene("A", "MKV", "MK"), "B": gene("B")}
    keys = RowKeys("scope")
    rows = {keys.of("MKV"): torch.ones(2), keys.of("MK"): torch.zeros(2)}
    first = assemble(["A", "B"], records, rows, keys=keys, dim=2, meta={})
    written = write_esm_file(tmp_path / "e.pt", first)
    assert written.gene_to_isoform_indices == {"A": [0, 1], "B": []}
    earlier = read_esm_file(tmp_path / "e.pt")
    more = assemble(["A", "C", "B"], {"C": gene("C", "W")},
                    {keys.of("W"): torch.full((2,), 7.0)}, keys=keys, dim=2, meta={},
                    reused=earlier)
    assert more["protein_ids"] == ["PA0", "PA1", "PC0"]
    assert more["gene_to_isoform_indices"] == {"A": [0, 1], "C": [2], "B": []}
    assert more["emb"][2].tolist() == [7.0, 7.0]


@pytest.mark.parametrize(("data", "message"), [
    ({"emb": torch.zeros(1, 2)}, "needs keys"),
    ({"emb": torch.zeros(2, 2), "genes": [], "protein_ids": ["p"],
      "gene_to_isoform_indices": {}}, "2 rows but 1 protein ids"),
    ({"emb": torch.zeros(1, 2), "genes": ["g"], "protein_ids": ["p"],
      "gene_to_isoform_indices": {"g": [3]}}, "out of range"),
])
def test_validate_names_what_is_wrong(data: dict, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        validate(data)


def test_reading_a_foreign_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(StoreError) as info:
        read_esm_file(tmp_path / "x.pt")
    assert "\n" not in str(info.value)
