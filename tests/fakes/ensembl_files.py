"""Ensembl FTP files (pep.all, canonical.tsv, ncrna) written from a FakeGene table.

The same table FakeEnsembl serves over REST, so the offline path can be compared with the
REST path gene by gene. Shapes follow the real release files:

    >ENSP00000493543.1 pep chromosome:GRCh38:7:140719327:140924929:-1 gene:ENSG....13
    transcript:ENST....1 gene_biotype:protein_coding transcript_biotype:protein_coding
    gene_symbol:BRAF description:B-Raf proto-oncogene [Source:HGNC Symbol;Acc:HGNC:1097]
    (sequence wrapped at 60 residues)

    canonical.tsv.gz: ENSG....13 <TAB> ENST....1 <TAB> Ensembl Canonical  (no header)

Extras the real files have and the REST fake does not: genes on CHR_* patch scaffolds
that repeat a primary gene's symbol under another gene ID (written first, as the real
pep.all starts with a patch gene), and genes whose headers carry no gene_symbol.
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.fakes.ensembl import FakeGene, FakeTranscript

NUCLEOTIDES = "ACGT"


@dataclass(frozen=True)
class WrittenFiles:
    pep: Path
    canonical: Path
    ncrna: Path | None


def patch_copy(gene: FakeGene, number: int = 1) -> FakeGene:
    """The gene again on a CHR_ patch: same symbol, new gene/transcript/protein IDs and
    different sequences (so a wrong pick shows)."""
    base = 800000000 + number * 1000
    transcripts = [
        FakeTranscript(f"ENST{base + k:011d}", t.biotype, t.is_canonical,
                       None if t.protein_id is None else f"ENSP{base + k:011d}",
                       None if t.sequence is None else "M" + t.sequence[1:][::-1])
        for k, t in enumerate(gene.transcripts)]
    return FakeGene(f"ENSG{base:011d}", gene.symbol, transcripts,
                    synonyms=list(gene.synonyms), region=f"CHR_HSCHR{6 + number}_1_CTG1")


def write_ensembl_files(
    directory: Path,
    genes: Sequence[FakeGene],
    *,
    species: str = "homo_sapiens",
    assembly: str = "GRCh38",
    release: int = 110,
    patches: Sequence[FakeGene] = (),
    without_symbol: Collection[str] = (),
    ncrna: bool = True,
    gzipped: bool = True,
) -> WrittenFiles:
    """Write the files a release directory holds for `genes` (+ `patches` on CHR_ regions).

    `without_symbol`: gene IDs whose headers omit gene_symbol. ncrna=False leaves out the
    optional ncrna file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    prefix = species[0].upper() + species[1:]
    placed = [(g, _patch_region(i)) for i, g in enumerate(patches)]
    placed += [(g, str(1 + i % 22)) for i, g in enumerate(genes)]
    suffix = ".gz" if gzipped else ""
    pep = directory / f"{prefix}.{assembly}.pep.all.fa{suffix}"
    canonical = directory / f"{prefix}.{assembly}.{release}.canonical.tsv{suffix}"
    _write(pep, "".join(_pep_entries(g, region, assembly, set(without_symbol))
                        for g, region in placed))
    _write(canonical, "".join(_canonical_row(g) for g, _ in placed))
    nc = None
    if ncrna:
        nc = directory / f"{prefix}.{assembly}.ncrna.fa{suffix}"
        _write(nc, "".join(_ncrna_entries(g, region, assembly, set(without_symbol))
                           for g, region in placed))
    return WrittenFiles(pep, canonical, nc)


def _patch_region(i: int) -> str:
    return f"CHR_HSCHR{7 + i}_2_CTG{6 + i}"


def _write(path: Path, text: str) -> None:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _gene_biotype(gene: FakeGene) -> str:
    biotypes = [t.biotype for t in gene.transcripts]
    return "protein_coding" if "protein_coding" in biotypes else biotypes[0]


def _header(kind: str, ident: str, gene: FakeGene, t: FakeTranscript, region: str,
            assembly: str, no_symbol: set[str], *, with_transcript: bool) -> str:
    start = 1000 + (int(gene.gene_id[-6:]) % 100000) * 100
    parts = [f">{ident} {kind} chromosome:{assembly}:{region}:{start}:{start + 5000}:1",
             f"gene:{gene.gene_id}.{gene.version}"]
    if with_transcript:
        parts.append(f"transcript:{t.transcript_id}.1")
    parts += [f"gene_biotype:{_gene_biotype(gene)}", f"transcript_biotype:{t.biotype}"]
    if gene.gene_id not in no_symbol:
        parts.append(f"gene_symbol:{gene.symbol}")
    parts.append(f"description:{gene.symbol} fake gene [Source:HGNC Symbol;Acc:HGNC:1]")
    return " ".join(parts)


def _pep_entries(gene: FakeGene, region: str, assembly: str, no_symbol: set[str]) -> str:
    out = []
    for t in gene.transcripts:
        if t.protein_id is None or t.sequence is None:
            continue
        header = _header("pep", f"{t.protein_id}.1", gene, t, region, assembly, no_symbol,
                         with_transcript=True)
        out.append(header + "\n" + _wrap(t.sequence))
    return "".join(out)


def _ncrna_entries(gene: FakeGene, region: str, assembly: str, no_symbol: set[str]) -> str:
    """Only genes with no translation at all are ncRNA genes (as in the real file)."""
    if any(t.protein_id for t in gene.transcripts):
        return ""
    rng = random.Random(gene.gene_id)
    out = []
    for t in gene.transcripts:
        header = _header("ncrna", f"{t.transcript_id}.1", gene, t, region, assembly,
                         no_symbol, with_transcript=False)
        out.append(header + "\n" + _wrap("".join(rng.choice(NUCLEOTIDES) for _ in range(90))))
    return "".join(out)


def _canonical_row(gene: FakeGene) -> str:
    canonical = [t for t in gene.transcripts if t.is_canonical]
    if not canonical:
        return ""
    return f"{gene.gene_id}.{gene.version}\t{canonical[0].transcript_id}.1\tEnsembl Canonical\n"


def _wrap(sequence: str, width: int = 60) -> str:
    return "".join(sequence[i:i + width] + "\n" for i in range(0, len(sequence), width))


def write_synonym_table(path: Path, genes: Sequence[FakeGene]) -> Path:
    """HGNC's complete set for `genes` (primary assembly only, as HGNC lists one Ensembl
    gene per symbol): the real file's header and column order, the first synonym as
    prev_symbol, the rest as aliases, multi-valued cells quoted and pipe-separated."""
    header = ("hgnc_id\tsymbol\tname\tlocus_group\tlocus_type\tstatus\tlocation\t"
              "location_sortable\talias_symbol\talias_name\tprev_symbol\tprev_name\t"
              "gene_group\tgene_group_id\tdate_approved_reserved\tdate_symbol_changed\t"
              "date_name_changed\tdate_modified\tentrez_id\tensembl_gene_id\n")
    lines = [header]
    for number, gene in enumerate(g for g in genes if not g.region.startswith("CHR_")):
        prev, aliases = gene.synonyms[:1], gene.synonyms[1:]
        cells = [f"HGNC:{number + 1}", gene.symbol, f"{gene.symbol} fake", "protein-coding gene",
                 "gene with protein product", "Approved", "1p1", "01p1", _cell(aliases), "",
                 _cell(prev), "", "", "", "2000-01-01", "", "", "2024-01-01", str(number + 1),
                 gene.gene_id]
        lines.append("\t".join(cells) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _cell(names: Sequence[str]) -> str:
    return "" if not names else names[0] if len(names) == 1 else '"' + "|".join(names) + '"'
