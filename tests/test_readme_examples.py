"""README's Python examples run as written, against what the CLI really writes.

Each ```python block of README.md is executed in a directory holding the outputs the
README's own commands make (esm_all.pt with per_tok states, residues.h5 from `export`,
hvg.txt), with the fake Ensembl server as $ENSEMBL_REST_URL and the tiny ESM2 in place of
the published weights. The only changes made to a block are those the tiny model and a
script need: "650M" becomes the tiny checkpoint, layer 20 its last layer, and a block of
top-level `async with` (valid in a notebook) runs inside asyncio.run.

README's embed_sequences example once held "MSEQ...", which raises on '.': it now embeds
a real sequence, and the last test keeps the reason.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from esm2_batch.cli import app
from esm2_batch.errors import InputError
from tests.fakes.ensembl import FakeEnsembl, braf, synthetic_genes
from tests.fakes.tiny_esm import write_tiny_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The README's outputs, made by the CLI, and the fake server they came from."""
    from typer.testing import CliRunner

    work = tmp_path_factory.mktemp("readme")
    checkpoint = write_tiny_checkpoint(work, num_layers=2, embed_dim=64, heads=4)
    (work / "hvg.txt").write_text("BRAF\nGENE0001\nGENE0002\n")
    with FakeEnsembl([braf(), *synthetic_genes(3)]).running_in_thread() as url:
        runner = CliRunner()
        for args in (["--hvg_file", str(work / "hvg.txt"), "--out", str(work / "esm_all.pt"),
                      "--model_path", str(checkpoint), "--ensembl_url", url, "--include",
                      "mean", "per_tok", "--no_cache", "-q"],
                     ["export", str(work / "esm_all.residues"), "--out",
                      str(work / "residues.h5"), "-q"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
        yield work, checkpoint


def runnable(code: str, checkpoint: Path) -> str:
    """`code` with the tiny model's and a script's changes (see the module docstring)."""
    code = code.replace('"650M"', repr(str(checkpoint)))
    code = re.sub(r"(store\.residues\([^,]+), 20\)", r"\1, 2)", code)
    if re.search(r"^(async with|async for|await )", code, re.M) and "asyncio.run" not in code:
        code = ("import asyncio\nqueries = ['BRAF']\nasync def _example():\n"
                + textwrap.indent(code, "    ") + "\nasyncio.run(_example())\n")
    return code


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_python_example_runs(number: int, workdir: tuple[Path, Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code = BLOCKS[number]
    work, checkpoint = workdir
    monkeypatch.chdir(work)
    with FakeEnsembl([braf(), *synthetic_genes(3)]).running_in_thread() as url:
        monkeypatch.setenv("ENSEMBL_REST_URL", url)
        exec(compile(runnable(code, checkpoint), f"README.md python block {number}", "exec"),
             {"__name__": f"readme_{number}"})


def test_the_old_embed_sequences_example_raises_on_the_dots(workdir: tuple[Path, Path]) -> None:
    """Why the README example had to change: '.' is not an amino acid."""
    from esm2_batch import embed_sequences, load_model

    model = load_model(workdir[1], device="cpu")
    with pytest.raises(InputError, match=r"invalid character '\.'"):
        embed_sequences(model, ["MKTAYIAKQR", ("my_protein", "MSEQ...")])
    ubiquitin = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"
    rows = embed_sequences(model, ["MKTAYIAKQR", ("ubiquitin", ubiquitin)])  # README's
    assert tuple(rows.shape) == (2, 64)
