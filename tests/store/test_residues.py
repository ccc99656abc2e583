"""The residue store: shards, index, lazy reader, crash debris, settings refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esm2_batch.errors import StoreError
from esm2_batch.store.residues import INDEX_FILE, ResidueWriter, ShardBuffer, open_residues

SETTINGS = {"model": "tiny", "weights": "abc", "layer": 2}


def _states(length: int, seed: int, layers: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(length, 8, generator=generator) for _ in range(layers)]


def test_write_and_read_lazily(tmp_path: Path) -> None:
    store = tmp_path / "res"
    writer = ResidueWriter(store, SETTINGS, layers=[1, 2], dim=8, shard_mb=0.0005)
    expected = {}
    for n in range(5):
        states = _states(10 + n, n, layers=2)
        writer.add(f"k{n}", f"P{n}", states)
        expected[f"P{n}"] = states
    writer.link({"P0-alias": "k0", "Pfailed": "unknown"})
    writer.close()
    index = json.loads((store / INDEX_FILE).read_text())
    assert len(index["shards"]) > 1  # 0.5 KB shards: one or two proteins each
    reader = open_residues(store)
    assert reader.layers == [1, 2] and len(reader) == 6 and "Pfailed" not in reader
    assert set(reader) == {*expected, "P0-alias"}
    for protein, states in expected.items():
        assert reader[protein].dtype == torch.float16
        assert reader[protein].shape == (len(states[0]), 8)
        torch.testing.assert_close(reader[protein], states[0].half())
        torch.testing.assert_close(reader.residues(protein, 2), states[1].half())
    assert torch.equal(reader["P0-alias"], reader["P0"])
    with pytest.raises(KeyError, match="layer 7"):
        reader.residues("P0", 7)


def test_reopen_skips_stored_and_drops_unfinished_shard(tmp_path: Path) -> None:
    """kill -9 after a shard's rename but before its index: the shard is debris."""
    store = tmp_path / "res"
    writer = ResidueWriter(store, SETTINGS, layers=[2], dim=8, shard_mb=0.0001)
    for n in range(3):
        writer.add(f"k{n}", f"P{n}", _states(12, n))
    writer.close()
    index = json.loads((store / INDEX_FILE).read_text())
    last = index["shards"].pop()
    index["proteins"] = {p: e for p, e in index["proteins"].items() if e["shard"] != last}
    (store / INDEX_FILE).write_text(json.dumps(index))
    (store / ".000009.safetensors.x.tmp").write_bytes(b"torn")
    again = ResidueWriter(store, SETTINGS, layers=[2], dim=8)
    assert again.stored_keys() == {"k0", "k1"}
    assert sorted(p.name for p in store.iterdir()) == [
        "000000.safetensors", "000001.safetensors", INDEX_FILE]
    again.add("k2", "P2", _states(12, 2))
    again.close()
    assert set(open_residues(store)) == {"P0", "P1", "P2"}


def test_other_settings_are_one_line(tmp_path: Path) -> None:
    store = tmp_path / "res"
    ResidueWriter(store, SETTINGS, layers=[2], dim=8).close()
    with pytest.raises(StoreError, match=r"other settings \(weights: 'abc' then, 'xyz'"):
        ResidueWriter(store, {**SETTINGS, "weights": "xyz"}, layers=[2], dim=8)
    ResidueWriter(store, {**SETTINGS, "weights": "xyz"}, layers=[2], dim=8,
                  overwrite=True).close()
    assert open_residues(store).settings["weights"] == "xyz"
    with pytest.raises(StoreError, match="not a residue store"):
        open_residues(tmp_path)


def test_adopt_names_a_shard_written_elsewhere(tmp_path: Path) -> None:
    """A Ray actor's shard (ShardBuffer, a name of its own) joins the index as the
    writer's own shards do; one never adopted is debris on the next open."""
    store = tmp_path / "res"
    writer = ResidueWriter(store, SETTINGS, layers=[1, 2], dim=8, keep_rows=True)
    states = {n: _states(10 + n, n, layers=2) for n in range(4)}
    remote = ShardBuffer([1, 2], keep_rows=True)
    for n in (0, 1):
        assert remote.add(f"k{n}", f"P{n}", states[n], torch.ones(3)) == 10 + n
    remote.write(store / "ray-a-000000.safetensors")
    orphan = ShardBuffer([1, 2])
    orphan.add("k3", "P3", states[3])
    orphan.write(store / "ray-b-000000.safetensors")  # its driver died before adopting
    writer.adopt("ray-a-000000.safetensors", {"k0": ("P0", 10)})
    writer.adopt("ray-a-000000.safetensors", {"k1": ("P1", 11)})  # rows split in two
    assert writer.stored_keys() == {"k0", "k1"}
    writer.add("k2", "P2", states[2])
    writer.add("k0", "P0-alias", states[0])  # a stored sequence: linked, not stored again
    writer.close()
    index = json.loads((store / INDEX_FILE).read_text())
    assert index["shards"] == ["ray-a-000000.safetensors", "000001.safetensors"]
    assert set(writer.stored_rows()) == {"k0", "k1"}
    reader = open_residues(store)
    assert set(reader) == {"P0", "P0-alias", "P1", "P2"}
    for n in (0, 1, 2):
        torch.testing.assert_close(reader.residues(f"P{n}", 2), states[n][1].half())
    ResidueWriter(store, SETTINGS, layers=[1, 2], dim=8).close()
    assert not (store / "ray-b-000000.safetensors").exists()


def test_adopt_refuses_what_is_not_a_shard_of_the_store(tmp_path: Path) -> None:
    writer = ResidueWriter(tmp_path / "res", SETTINGS, layers=[2], dim=8)
    with pytest.raises(StoreError, match="not in the store directory"):
        writer.adopt("ray-a-000000.safetensors", {"k0": ("P0", 3)})
    with pytest.raises(StoreError, match="not a shard name"):
        writer.adopt("../x.safetensors", {"k0": ("P0", 3)})
    assert writer.proteins == set()
