"""Offline Ensembl: the REST client's GeneIsoforms, built from Ensembl's FTP files.

For when rest.ensembl.org is down, slow for a big list, or out of reach (a cluster node).
One species, one release:

    fasta/<species>/pep/<Species>.<Assembly>.pep.all.fa.gz            required
        every translation: >ENSP.v pep chromosome:GRCh38:7:...:-1 gene:ENSG.v
        transcript:ENST.v gene_biotype:X transcript_biotype:Y [gene_symbol:S] description:..
    tsv/<species>/<Species>.<Assembly>.<release>.canonical.tsv.gz     required
        no header, tab-separated: ENSG.v  ENST.v  Ensembl Canonical  (one row per gene,
        coding or not)
    fasta/<species>/ncrna/<Species>.<Assembly>.ncrna.fa.gz            optional
        non-coding RNA genes; only the headers are read (gene, gene_symbol, location)

under https://ftp.ensembl.org/pub/release-<N>/. Assemblies: homo_sapiens GRCh38 (release
76 on); mus_musculus GRCm39 from release 103, GRCm38 before. Other species need the
assembly named (it is in the directory listing of fasta/<species>/pep/).

Same records as the REST path for the same release (tests compare them on one gene
table): IDs are matched without version and case, symbols exactly; transcripts count when
their transcript_biotype is wanted; the canonical transcript is the canonical file's; the
isoforms are ordered by records.isoform_sort_key and built by the REST path's own
parse.build_gene. Statuses:

    ok          the gene has a translation of a wanted biotype
    no_protein  the gene is known (pep with other biotypes only, the canonical file, or
                ncrna) but has no such translation
    not_found   nothing names it

What the files cannot tell: pep.all lists translated transcripts only and the canonical
file has no symbols, so a non-coding gene asked for by symbol is not_found unless the
ncrna file is there (an ID query is no_protein either way). Pseudogene symbols are not in
ncrna and stay not_found.

Symbols the files do not know (an outdated name: SEPT5, KIAA0101) are resolved through a
synonym table (HGNC's complete set, `--synonyms FILE`, or hgnc_complete_set.txt in the
files' directory as `esm2-batch download` puts it there) by the same rule as the REST
path's xrefs lookup (sources/synonyms.py): one primary-assembly gene resolves, several
are ambiguous, and one the list already asks for is a duplicate.

Two things the REST path does not do: a symbol with no exact match is matched ignoring
case (with a warning: a human list run against mouse names Braf, not BRAF), and a symbol
carried by several genes (patch scaffolds CHR_* repeat primary-assembly symbols under
other gene IDs) resolves to the primary-assembly gene, then the one with a protein, then
the lowest ID: deterministic where the server is not specified.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from esm2_batch.errors import InputError
from esm2_batch.records import (
    GeneIsoforms,
    MatchedBy,
    is_ensembl_gene_id,
    query_key,
    strip_version,
)
from esm2_batch.sources.base import SourceOptions
from esm2_batch.sources.ensembl_ftp import (
    SYNONYM_FILE_NAME,
    EnsemblFiles,
    ensembl_cache_dir,
    find_ensembl_files,
)
from esm2_batch.sources.ensembl_rest.client import DEFAULT_BIOTYPES
from esm2_batch.sources.ensembl_rest.parse import (
    GeneRecord,
    Translation,
    ambiguous,
    build_gene,
    duplicate,
    no_protein,
    not_found,
)
from esm2_batch.sources.fasta import iter_fasta, iter_fasta_headers, open_text
from esm2_batch.sources.gene_lists import as_duplicates, dedupe
from esm2_batch.sources.synonyms import (
    Candidate,
    DuplicateGuard,
    SynonymTable,
    choose,
    synonym_file_url,
    worth_a_lookup,
)

__all__ = ["EnsemblFilesIndex", "EnsemblFilesSource", "isoforms_from_files"]

log = logging.getLogger("esm2_batch")

_MIXED_RELEASES = 0.05  # share of canonical transcripts whose versions differ from pep's


# ------------------------------------------------------------------------- parsing


@dataclass
class _Gene:
    """One gene as the files describe it; `rank` orders genes that share a symbol."""

    gene_id: str
    symbol: str | None
    rank: int  # 0 chromosome, 1 other primary region (scaffold), 2 CHR_* patch, 3 unknown
    translations: list[tuple[Translation, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Header:
    ident: str
    version: str
    fields: dict[str, str]
    rank: int


def _parse_header(line: str) -> _Header:
    """'ENSP.v pep chromosome:GRCh38:7:1:2:-1 gene:... description:...' -> fields."""
    head = line.split(" description:", 1)[0]
    tokens = head.split()
    ident, _, version = tokens[0].partition(".") if tokens else ("", "", "")
    fields: dict[str, str] = {}
    rank = 3
    for position, token in enumerate(tokens[1:], start=1):
        key, sep, value = token.partition(":")
        if not sep:
            continue
        if position == 2 and value.count(":") >= 4:  # the location: coord_system:asm:region
            rank = _location_rank(key, value.split(":")[1])
        else:
            fields.setdefault(key, value)
    return _Header(ident, version, fields, rank)


def _location_rank(coord_system: str, region: str) -> int:
    if region.startswith("CHR_"):
        return 2
    return 0 if coord_system in ("chromosome", "primary_assembly") else 1


def _read_canonical(path: Path) -> dict[str, tuple[str, str]]:
    """{ENSG: (ENST, ENST version)} from the canonical file (tolerates a header line)."""
    canonical: dict[str, tuple[str, str]] = {}
    try:
        with open_text(path) as handle:
            for line in handle:
                cells = line.rstrip("\n").split("\t")
                if len(cells) < 2 or not cells[0].upper().startswith("ENS"):
                    continue
                if len(cells) > 2 and "canonical" not in cells[2].lower():
                    continue
                transcript, _, version = cells[1].strip().partition(".")
                canonical[strip_version(cells[0].strip()).upper()] = (transcript, version)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable canonical.tsv.gz ({exc}); download it "
                         "again") from exc
    return canonical


class EnsemblFilesIndex:
    """The parsed files: genes by ID and by symbol, ready to answer any number of lists.

    Loading human release files (120,000 translations) takes a few seconds and holds the
    sequences in memory (about 50 MB); build it once per run.
    """

    def __init__(self, genes: dict[str, _Gene], canonical: dict[str, tuple[str, str]],
                 files: EnsemblFiles | None = None) -> None:
        self.files = files
        self._genes = genes  # by upper-case ENSG, no version
        self._canonical = canonical
        self._by_symbol: dict[str, list[_Gene]] = {}
        self._by_folded: dict[str, list[_Gene]] = {}
        for gene in genes.values():
            if gene.symbol:
                self._by_symbol.setdefault(gene.symbol, []).append(gene)
                self._by_folded.setdefault(gene.symbol.casefold(), []).append(gene)

    @classmethod
    def load(cls, files: EnsemblFiles) -> EnsemblFilesIndex:
        """Parse pep, canonical and (if present) ncrna; refuse files of mixed releases."""
        canonical = _read_canonical(files.canonical)
        genes: dict[str, _Gene] = {}
        versions = _read_pep(files.pep, canonical, genes)
        _check_same_release(files, canonical, versions)
        if files.ncrna is not None:
            _read_ncrna(files.ncrna, genes)
        return cls(genes, canonical, files)

    def isoforms(self, queries: Iterable[str], *,
                 biotypes: Iterable[str] = DEFAULT_BIOTYPES,
                 synonyms: SynonymTable | None = None) -> list[GeneIsoforms]:
        """One GeneIsoforms per distinct query, in input order (as fetch_isoforms, later
        spellings of one gene as duplicates of the first); with `synonyms`, unknown
        symbols are looked up as previous names and aliases."""
        return as_duplicates(list(self.iter_isoforms(queries, biotypes=biotypes,
                                                     synonyms=synonyms)))

    def iter_isoforms(self, queries: Iterable[str], *,
                      biotypes: Iterable[str] = DEFAULT_BIOTYPES,
                      synonyms: SynonymTable | None = None) -> Iterator[GeneIsoforms]:
        """`isoforms`, one gene at a time: a whole proteome (--all_genes) is never held
        as records twice over while the run embeds and stores them. The case-fold
        warning comes once, when the list is exhausted."""
        wanted = set(biotypes)
        folded: list[tuple[str, str]] = []
        distinct = dedupe(queries).genes
        guard = DuplicateGuard.of(distinct)
        for query in distinct:
            gene, by_case = self._find(query)
            if by_case and gene is not None and gene.symbol:
                folded.append((query, gene.symbol))
            if gene is None and synonyms is not None and worth_a_lookup(query):
                yield self._by_synonym(query, synonyms, guard, wanted)
                continue
            yield self._record(query, gene, wanted)
        if folded:
            shown = ", ".join(f"{q} -> {s}" for q, s in folded[:5])
            log.warning("%d symbols matched only ignoring case (%s%s); check --species "
                        "(human symbols are upper case, mouse ones capitalised)", len(folded),
                        shown, " ..." if len(folded) > 5 else "")

    def all_genes(self, biotypes: Iterable[str] = DEFAULT_BIOTYPES) -> list[str]:
        """Every gene ID (no version) with a translation of a wanted biotype, sorted: the
        proteome of --all_genes. Genes on CHR_* patches and haplotypes only (rank 2) are
        left out: they repeat primary-assembly genes under other IDs, so keeping them
        would embed those proteins twice."""
        wanted = set(biotypes)
        return sorted(g.gene_id for g in self._genes.values()
                      if g.rank != 2 and any(t.biotype in wanted for t, _ in g.translations))

    def _find(self, query: str) -> tuple[_Gene | None, bool]:
        """The gene a query names, and whether it took a case-insensitive match."""
        if is_ensembl_gene_id(query):
            key = query_key(query)
            gene = self._genes.get(key)
            if gene is None and key in self._canonical:
                gene = _Gene(key, None, 3)  # known (canonical file) but never translated
            return gene, False
        candidates = self._by_symbol.get(query)
        if candidates:
            return _best(candidates), False
        candidates = self._by_folded.get(query.casefold())
        return (_best(candidates), True) if candidates else (None, False)

    def _by_synonym(self, query: str, table: SynonymTable, guard: DuplicateGuard,
                    wanted: set[str]) -> GeneIsoforms:
        """The record of a symbol the files do not know, through the synonym table."""
        found = [g for gid in sorted(table.gene_ids(query))
                 if (g := self._genes.get(gid)) is not None]
        choice = choose(Candidate(g.gene_id, g.symbol or table.symbols.get(g.gene_id.upper()),
                                  g.rank != 2, any(t.biotype in wanted
                                                   for t, _ in g.translations))
                        for g in found)
        if choice is None:
            return not_found(query)
        if isinstance(choice, list):
            return ambiguous(query, [(c.gene_id, c.symbol) for c in choice])
        gene = next(g for g in found if g.gene_id == choice.gene_id)
        if gene.symbol is None:
            gene = _Gene(gene.gene_id, choice.symbol, gene.rank, gene.translations)
        other = guard.claim(query, gene.gene_id, gene.symbol)
        if other is not None:
            return duplicate(query, GeneRecord(gene.gene_id, gene.symbol, ()), other)
        return self._record(query, gene, wanted, matched_by="synonym")

    def _record(self, query: str, gene: _Gene | None, wanted: set[str],
                matched_by: MatchedBy | None = None) -> GeneIsoforms:
        if gene is None:
            return not_found(query)
        kept = [(t, seq) for t, seq in gene.translations if t.biotype in wanted]
        record = GeneRecord(gene.gene_id, gene.symbol, tuple(t for t, _ in kept))
        if not kept:
            return no_protein(query, record, matched_by=matched_by)
        return build_gene(query, record, {t.protein_id: seq for t, seq in kept},
                          matched_by=matched_by)


def _best(candidates: list[_Gene]) -> _Gene:
    """Primary assembly over scaffolds over CHR_* patches; then coding; then lowest ID."""
    return min(candidates, key=lambda g: (g.rank, not g.translations, g.gene_id))


def _read_pep(path: Path, canonical: dict[str, tuple[str, str]],
              genes: dict[str, _Gene]) -> dict[str, str]:
    """Fill `genes` from pep.all; return {ENST: version} for the release check."""
    canonical_tx = {tx for tx, _ in canonical.values()}
    versions: dict[str, str] = {}
    try:
        for header, sequence in iter_fasta(path):
            parsed = _parse_header(header)
            gene_field, tx_field = parsed.fields.get("gene"), parsed.fields.get("transcript")
            if not gene_field or not tx_field or not parsed.ident:
                raise InputError(f"{path}: a header without gene: or transcript: "
                                 f"({header[:80]}); is this Ensembl's pep.all.fa.gz?")
            transcript, _, tx_version = tx_field.partition(".")
            versions[transcript] = tx_version
            gene = _gene_for(genes, strip_version(gene_field), parsed)
            translation = Translation(protein_id=parsed.ident, transcript_id=transcript,
                                      is_canonical=transcript in canonical_tx,
                                      biotype=parsed.fields.get("transcript_biotype", ""),
                                      length=len(sequence.rstrip("*")))
            gene.translations.append((translation, sequence.rstrip("*")))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable pep.all.fa.gz ({exc}); download it "
                         "again") from exc
    return versions


def _gene_for(genes: dict[str, _Gene], gene_id: str, header: _Header) -> _Gene:
    key = gene_id.upper()
    gene = genes.get(key)
    if gene is None:
        gene = genes[key] = _Gene(gene_id, header.fields.get("gene_symbol"), header.rank)
    return gene


def _read_ncrna(path: Path, genes: dict[str, _Gene]) -> None:
    """Genes of the ncrna file not already known: recognised, without translations."""
    try:
        for header in iter_fasta_headers(path):
            parsed = _parse_header(header)
            gene_field = parsed.fields.get("gene")
            if gene_field:
                _gene_for(genes, strip_version(gene_field), parsed)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable ncrna.fa.gz ({exc}); download it again, "
                         "or remove it (it is optional)") from exc


def _check_same_release(files: EnsemblFiles, canonical: dict[str, tuple[str, str]],
                        versions: dict[str, str]) -> None:
    """pep.all's name carries no release: catch a pep and a canonical file that differ."""
    shared = [(tx, v) for tx, v in canonical.values() if tx in versions and v]
    differ = sum(versions[tx] != v for tx, v in shared)
    if shared and differ > _MIXED_RELEASES * len(shared):
        raise InputError(f"{files.pep.name} and {files.canonical.name} look like different "
                         f"Ensembl releases ({differ} of {len(shared)} canonical transcripts "
                         "have other versions); download both for the same release")


# ------------------------------------------------------------------------- one call


def isoforms_from_files(queries: Iterable[str], files: EnsemblFiles | str | os.PathLike[str],
                        *, species: str = "homo_sapiens", release: int | None = None,
                        biotypes: Sequence[str] = DEFAULT_BIOTYPES,
                        synonyms: SynonymTable | str | os.PathLike[str] | None = None
                        ) -> list[GeneIsoforms]:
    """fetch_isoforms without the network: one GeneIsoforms per distinct query, in order.

    `files` is an EnsemblFiles or a directory (then species and release pick the files).
    `synonyms`: a synonym table (HGNC's complete set) or its path, for outdated symbols.
    """
    found = files if isinstance(files, EnsemblFiles) else find_ensembl_files(
        files, species, release)
    table = synonyms if isinstance(synonyms, SynonymTable | None) else SynonymTable.read(
        synonyms)
    return EnsemblFilesIndex.load(found).isoforms(queries, biotypes=biotypes, synonyms=table)


def find_synonym_table(options: SourceOptions, directory: Path) -> SynonymTable | None:
    """--synonyms FILE, else the table `download` put next to the Ensembl files, else
    None (then outdated symbols stay not found, with a note in the summary)."""
    if not options.synonyms:
        return None
    path = options.synonyms_file
    if path is None and synonym_file_url(options.species) is not None:
        path = directory / SYNONYM_FILE_NAME
        if not path.is_file():
            return None
    return SynonymTable.read(path) if path is not None else None


@dataclass(frozen=True)
class EnsemblFilesSource:
    """An IsoformSource (sources/base.py) over Ensembl's FTP files: offline."""

    index: EnsemblFilesIndex
    files: EnsemblFiles
    biotypes: tuple[str, ...]
    synonyms: SynonymTable | None = None
    strict: bool = False  # --no_synonyms

    @classmethod
    def open(cls, options: SourceOptions) -> EnsemblFilesSource:
        """Find and parse the files of --ensembl_files (or the download cache) and the
        synonym table now."""
        release = options.ensembl_release
        directory = options.ensembl_files or ensembl_cache_dir(release or 0)
        found = find_ensembl_files(directory, options.species, release)
        return cls(EnsemblFilesIndex.load(found), found, options.biotypes,
                   find_synonym_table(options, Path(directory)), not options.synonyms)

    async def stream(self, queries: Sequence[str]) -> AsyncIterator[GeneIsoforms]:
        for gene in self.index.iter_isoforms(queries, biotypes=self.biotypes,
                                             synonyms=self.synonyms):
            yield gene

    def provenance(self) -> dict[str, str | int]:
        found: dict[str, str | int] = {"isoform_source": f"ensembl-files:{self.files.pep.parent}"}
        if self.files.release is not None:
            found["ensembl_release"] = self.files.release
        return found

    def describe(self) -> str | None:
        line = f"isoforms from Ensembl files: {self.files.pep}"
        if self.synonyms is not None and self.synonyms.path is not None:
            return f"{line}; outdated symbols through {self.synonyms.path}"
        if self.strict:
            return line
        return (f"{line}; no synonym table, so outdated symbols (SEPT5) stay not found: "
                "pass --synonyms TABLE (HGNC's hgnc_complete_set.txt for human)")

    def unreachable(self) -> str | None:
        return None  # local files, checked when opened

    def known_queries(self) -> Sequence[str] | None:
        return None

    def all_genes(self) -> Sequence[str] | None:
        return self.index.all_genes(self.biotypes)
