"""Where Ensembl's FTP files are, and how they arrive: the offline path's first half.

    fasta/<species>/pep/<Species>.<Assembly>.pep.all.fa.gz            required
    tsv/<species>/<Species>.<Assembly>.<release>.canonical.tsv.gz     required
    fasta/<species>/ncrna/<Species>.<Assembly>.ncrna.fa.gz            optional
    hgnc_complete_set.txt (human): previous and alias symbols         optional

under https://ftp.ensembl.org/pub/release-<N>/ (HGNC's file from HGNC). `esm2-batch
download` fetches them into the cache (or prints curl lines for a machine with the
network); `find_ensembl_files` finds them again, refusing a half-downloaded set with a
one-line error naming what is missing. Parsing them is ensembl_files.py's half.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from esm2_batch.errors import EnsemblUnavailableError, InputError
from esm2_batch.sources.synonyms import synonym_file_url
from esm2_batch.store.atomic import atomic_write
from esm2_batch.store.cache import user_cache_root

__all__ = [
    "FTP_BASE_URL",
    "SYNONYM_FILE_NAME",
    "EnsemblFiles",
    "default_assembly",
    "download_commands",
    "download_ensembl_files",
    "download_synonym_table",
    "ensembl_cache_dir",
    "ensembl_file_urls",
    "find_ensembl_files",
    "species_prefix",
]

log = logging.getLogger("esm2_batch")

FTP_BASE_URL = "https://ftp.ensembl.org/pub"
# (first release, assembly), newest first: the assembly a release's files are named after.
_ASSEMBLIES: dict[str, tuple[tuple[int, str], ...]] = {
    "homo_sapiens": ((76, "GRCh38"),),
    "mus_musculus": ((103, "GRCm39"), (68, "GRCm38")),
}
_SPECIES = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")


# ------------------------------------------------------------------------- locating files


@dataclass(frozen=True)
class EnsemblFiles:
    """The files of one species and release (ncrna optional)."""

    species: str
    pep: Path
    canonical: Path
    ncrna: Path | None = None
    release: int | None = None
    assembly: str | None = None


def species_prefix(species: str) -> str:
    """homo_sapiens -> Homo_sapiens, the file-name spelling; refuses other spellings."""
    name = species.strip().lower()
    if not _SPECIES.match(name):
        raise InputError(f"--species {species!r}: use Ensembl's production name, like "
                         "homo_sapiens or mus_musculus")
    return name[0].upper() + name[1:]


def default_assembly(species: str, release: int) -> str:
    """The assembly a release names its files after, for the species this module knows."""
    for first, assembly in _ASSEMBLIES.get(species.strip().lower(), ()):
        if release >= first:
            return assembly
    raise InputError(f"no known assembly for {species} release {release}; pass it (the "
                     f"name in {FTP_BASE_URL}/release-{release}/fasta/{species}/pep/, e.g. "
                     "GRCz11 for danio_rerio)")


def ensembl_file_urls(species: str, release: int, assembly: str | None = None, *,
                      ncrna: bool = True, base_url: str = FTP_BASE_URL) -> list[str]:
    """The exact URLs of the files for one species and release: pep, canonical[, ncrna]."""
    prefix = species_prefix(species)
    name = prefix.lower()
    assembly = assembly or default_assembly(name, release)
    root = f"{base_url.rstrip('/')}/release-{int(release)}"
    urls = [f"{root}/fasta/{name}/pep/{prefix}.{assembly}.pep.all.fa.gz",
            f"{root}/tsv/{name}/{prefix}.{assembly}.{int(release)}.canonical.tsv.gz"]
    if ncrna:
        urls.append(f"{root}/fasta/{name}/ncrna/{prefix}.{assembly}.ncrna.fa.gz")
    return urls


def download_commands(species: str, release: int, directory: str | os.PathLike[str],
                      assembly: str | None = None, *, ncrna: bool = True,
                      base_url: str = FTP_BASE_URL) -> list[str]:
    """curl lines that fetch the files into `directory`, for a machine with the network
    when the one that runs esm2-batch has none (copy the directory across afterwards)."""
    target = Path(directory)
    return [f"curl -fL --create-dirs -o {target / url.rsplit('/', 1)[1]} {url}"
            for url in ensembl_file_urls(species, release, assembly, ncrna=ncrna,
                                         base_url=base_url)]


def ensembl_cache_dir(release: int) -> Path:
    """Where `--ensembl_release N` looks by default: $ESM2_BATCH_ENSEMBL_DIR/release-N,
    else <user cache>/esm2_batch/ensembl/release-N (files of several species can share it)."""
    root = os.environ.get("ESM2_BATCH_ENSEMBL_DIR")
    base = Path(root) if root else user_cache_root() / "ensembl"
    return base / f"release-{int(release)}"


def find_ensembl_files(directory: str | os.PathLike[str], species: str,
                       release: int | None = None, *,
                       assembly: str | None = None) -> EnsemblFiles:
    """Find one species' pep, canonical (and ncrna) files in a directory.

    With `release`, the canonical file must be that release's; without, the directory
    must hold exactly one. Raises InputError naming what is missing and where to get it.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory; pass the directory holding the "
                         "Ensembl files to --ensembl_files")
    prefix = species_prefix(species)
    asm = re.escape(assembly) if assembly else r"[^/]+?"
    rel = str(int(release)) if release is not None else r"\d+"
    canonical = _one(root, rf"{prefix}\.({asm})\.({rel})\.canonical\.tsv\.gz", "canonical",
                     species, release)
    match = re.fullmatch(rf"{prefix}\.(.+)\.(\d+)\.canonical\.tsv\.gz", canonical.name)
    assert match is not None
    found_assembly, found_release = match.group(1), int(match.group(2))
    pep = _one(root, rf"{prefix}\.{re.escape(found_assembly)}\.pep\.all\.fa\.gz", "pep",
               species, found_release)
    ncrna = root / f"{prefix}.{found_assembly}.ncrna.fa.gz"
    return EnsemblFiles(species=prefix.lower(), pep=pep, canonical=canonical,
                        ncrna=ncrna if ncrna.is_file() else None, release=found_release,
                        assembly=found_assembly)


def _one(root: Path, pattern: str, kind: str, species: str, release: int | None) -> Path:
    hits = sorted(p for p in root.iterdir() if re.fullmatch(pattern, p.name))
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise InputError(f"{root}: several {kind} files for {species} "
                         f"({', '.join(p.name for p in hits)}); keep one, or pass the "
                         "release (--ensembl_release)")
    where = (f"; download it: esm2-batch download --species {species} --ensembl_release "
             f"{release}" if release is not None else "")
    raise InputError(f"{root}: no {kind} file for {species} "
                     f"({_EXAMPLES[kind].format(prefix=species_prefix(species))}){where}")


_EXAMPLES = {"pep": "{prefix}.<assembly>.pep.all.fa.gz",
             "canonical": "{prefix}.<assembly>.<release>.canonical.tsv.gz"}


def download_ensembl_files(species: str, release: int,
                           directory: str | os.PathLike[str] | None = None, *,
                           assembly: str | None = None, ncrna: bool = True,
                           base_url: str = FTP_BASE_URL, timeout: float = 60.0) -> EnsemblFiles:
    """Fetch the files (skipping those already there) into `directory` (default: the
    cache directory of the release). Each file is written under a temporary name and
    renamed, so an interrupted download is fetched again, never half-used.

    Raises EnsemblUnavailableError naming the URL when the server cannot be reached.
    """
    target = Path(directory) if directory is not None else ensembl_cache_dir(release)
    target.mkdir(parents=True, exist_ok=True)
    for url in ensembl_file_urls(species, release, assembly, ncrna=ncrna, base_url=base_url):
        path = target / url.rsplit("/", 1)[1]
        if not path.is_file() or path.stat().st_size == 0:
            _fetch(url, path, timeout)
    return find_ensembl_files(target, species, release, assembly=assembly)


def _fetch(url: str, path: Path, timeout: float) -> None:
    log.info("downloading %s", url)

    def stream(out: BinaryIO) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            shutil.copyfileobj(reply, out, length=1 << 20)

    try:
        atomic_write(path, stream)
    except (urllib.error.URLError, OSError) as exc:
        raise EnsemblUnavailableError(f"cannot download {url} ({exc}); fetch it by hand into "
                                      f"{path.parent}") from exc


SYNONYM_FILE_NAME = "hgnc_complete_set.txt"


def download_synonym_table(species: str, directory: str | os.PathLike[str], *,
                           url: str | None = None, timeout: float = 120.0) -> Path | None:
    """Fetch HGNC's complete set (about 16 MB) next to the Ensembl files, where offline
    runs find it; None for a species without a known table. Skips a file already there."""
    url = url or synonym_file_url(species)
    if url is None:
        return None
    path = Path(directory) / SYNONYM_FILE_NAME
    if not path.is_file() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _fetch(url, path, timeout)
    return path
