"""Why a gene was not resolved, in words a single-cell researcher can act on.

A gene list from a 2016 Seurat object, a mouse list run as human, a spreadsheet that
turned SEPT7 into a date: each leaves genes without a vector, and "not found" alone does
not say which fix applies. `likely_reason` reads the query's shape (an Ensembl ID of
another species or kind, a clone name like RP11-34P13.3, a non-coding name, a spreadsheet
date like 7-Sep, an NCBI placeholder, the other species' case) and its status.

The reasons are heuristics on the name, worded as "likely"; they never change a status.
They live with the sources because they are knowledge about gene names and Ensembl's IDs,
as the synonym lookup's patterns are (records.py holds the patterns both share); the run's
reports (run/reports.py) only write them down.
"""

from __future__ import annotations

import re

from esm2_batch.records import (
    ACCESSION_NAME,
    CLONE_NAME,
    SPREADSHEET_DATE,
    is_ensembl_gene_id,
    strip_version,
)

__all__ = ["RETRY", "likely_reason"]

# A finished run's esm_all.pt is reused as is, so only --overwrite asks Ensembl again.
RETRY = "rerun the same command to retry"

# Ensembl gene-ID prefixes (before the G) of common species: ENSG human, ENSMUSG mouse, ...
_ID_SPECIES = {"ENS": "homo_sapiens", "ENSMUS": "mus_musculus", "ENSRNO": "rattus_norvegicus",
               "ENSDAR": "danio_rerio", "ENSGAL": "gallus_gallus", "ENSSSC": "sus_scrofa",
               "ENSMMU": "macaca_mulatta", "ENSBTA": "bos_taurus",
               "ENSCAF": "canis_lupus_familiaris"}
_GENE_ID_PREFIX = re.compile(r"^(ENS[A-Z]*?)G\d{11}", re.IGNORECASE)
_OTHER_ENSEMBL_ID = re.compile(r"^ENS[A-Z]*([TPE])\d{11}(\.\d+)?$", re.IGNORECASE)
_ID_KIND = {"T": "a transcript ID (ENST)", "P": "a protein ID (ENSP)", "E": "an exon ID (ENSE)"}
# hg19-era clone names: RP11-34P13.3, CTD-2510F5.4, XXbac-B461K10.4, KB-1183D5.13
_CLONE = CLONE_NAME  # shared with the synonym lookup (records.py)
# accession-based names of novel genes: AC012345.1, AL627309.5, AP001234.2, Z98884.1
_ACCESSION = ACCESSION_NAME
_RFAM = re.compile(r"^(Y_RNA|U[1-8]|U6atac|5S_rRNA|5_8S_rRNA|7SK|Metazoa_SRP|snoU\d+|SNOR[AD]\d*"
                   r"|uc_\d+|Vault|ACA\d+|SCARNA\d+|snosnR\d+|SCARNA)$", re.IGNORECASE)
_NONCODING = re.compile(
    r"^(MIR\d|LINC\d|SNHG\d|SNOR[AD]\d|SCARNA\d|RNU\d|RNA5S|RNA5-8S|RNY\d|VTRNA|MT-T[A-Z]|MT-RNR)"
    r"|(-AS\d+|-DT|-IT\d+|-OT\d+)$", re.IGNORECASE)
_NCBI_LOC = re.compile(r"^LOC\d+$", re.IGNORECASE)
_MOUSE_PREDICTED = re.compile(r"^Gm\d+$")
_HUMAN_ORF = re.compile(r"\dorf\d")
_RIBO_PSEUDO = re.compile(r"^RP[LS]\d+[A-Z]?\d*P\d+$", re.IGNORECASE)
_EXCEL_DATE = SPREADSHEET_DATE
_RENAMED = ((re.compile(r"^SEPT(\d+)$", re.IGNORECASE), "SEPTIN{0}"),
            (re.compile(r"^MARCH(\d+)$", re.IGNORECASE), "MARCHF{0}"))
_MAKE_UNIQUE = re.compile(r"^.+[A-Za-z]-\d+$")


def likely_reason(query: str, status: str, *, species: str | None = None) -> str:
    """The most likely reason `query` came back with `status` ("" for "ok").

    `species` (the --species of the run) lets it spot a list of the other organism.
    """
    if status == "ok":
        return ""
    if status == "no_protein":
        return ("non-coding gene: no protein-coding transcript (of the requested biotypes), "
                "so no ESM2 vector")
    if status == "incomplete":
        return f"protein sequences not returned by Ensembl; {RETRY}"
    query = query.strip()
    if is_ensembl_gene_id(query):
        return _id_reason(query, species)
    for check in (_other_id, _clone_name, _noncoding_name, _spreadsheet, _placeholder):
        reason = check(query)
        if reason:
            return reason
    return _case_reason(query, species) or _unknown_symbol(query)


def _id_reason(query: str, species: str | None) -> str:
    match = _GENE_ID_PREFIX.match(query)
    owner = _ID_SPECIES.get(match.group(1).upper()) if match else None
    if owner and species and owner != species.lower():
        return f"an Ensembl ID of {owner}, but the run's species is {species}: check --species"
    return (f"Ensembl ID not in this release (retired or merged); look up its history at "
            f"https://www.ensembl.org/id/{strip_version(query)}")


def _other_id(query: str) -> str:
    match = _OTHER_ENSEMBL_ID.match(query)
    if match:
        return f"{_ID_KIND[match.group(1).upper()]}, not a gene ID: give the ENSG gene ID"
    return ""


def _clone_name(query: str) -> str:
    if _CLONE.match(query):
        return ("old clone-based name (RP11-..., CTD-...) retired from current Ensembl: "
                "usually a lncRNA; take its Ensembl ID from the study's annotation")
    if _ACCESSION.match(query):
        return ("clone-based name (AC..., AL...) of a novel, usually non-coding gene; such "
                "names change between releases: use the Ensembl ID")
    return ""


def _noncoding_name(query: str) -> str:
    if _RFAM.match(query):
        return ("RNA family name shared by many non-coding genes (Rfam); no single gene "
                "and no protein")
    if _NONCODING.search(query):
        return "non-coding gene by its name (miRNA, lncRNA, snoRNA, antisense ...): no protein"
    if _RIBO_PSEUDO.match(query):
        return "ribosomal protein pseudogene (RPL/RPS...P): no protein of its own"
    return ""


def _spreadsheet(query: str) -> str:
    if _EXCEL_DATE.match(query):
        return ("a gene name turned into a date by a spreadsheet (1-Mar = MARCHF1, "
                "7-Sep = SEPTIN7); fix the list")
    for pattern, template in _RENAMED:
        match = pattern.match(query)
        if match:
            return f"renamed symbol: now {template.format(match.group(1))}"
    return ""


def _placeholder(query: str) -> str:
    if _NCBI_LOC.match(query):
        return ("NCBI placeholder name (LOC...) that Ensembl does not use: map it to an "
                "Ensembl ID through NCBI Gene")
    if _MOUSE_PREDICTED.match(query):
        return ("predicted-gene name (Gm...): often renamed or retired between releases; use "
                "the Ensembl ID")
    return ""


def _case_reason(query: str, species: str | None) -> str:
    if not species or _HUMAN_ORF.search(query):
        return ""
    letters = [c for c in query if c.isalpha()]
    if species.lower() == "homo_sapiens" and letters and any(c.islower() for c in letters):
        return ("mouse-style symbol (Braf) in a human run: check --species "
                "(human symbols are upper case)")
    if species.lower() == "mus_musculus" and len(letters) > 1 and all(
            c.isupper() for c in letters):
        return ("human-style symbol (BRAF) in a mouse run with no mouse gene of that name: "
                "check --species, or its mouse orthologue's symbol")
    return ""


def _unknown_symbol(query: str) -> str:
    reason = "unknown symbol: renamed (check HGNC/MGI for the current name), a synonym, or misspelt"
    if _MAKE_UNIQUE.match(query):
        reason += "; a '-1' suffix from var_names_make_unique?"
    return reason
