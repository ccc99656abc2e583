"""EnsemblClient: genes (symbols or IDs, mixed) -> every protein isoform, canonical first.

Request plan (bulk POST endpoints only):

1. POST lookup/id (expand=1) for gene IDs and POST lookup/symbol/{species} (expand=1)
   for symbols, `lookup_chunk_size` queries per request. Ensembl accepts 1000, but one
   expanded gene carries every transcript and exon (BRAF alone is 78 kB), so 1000 genes
   make replies of tens of MB that are slow to build and to retry; 100 keeps a reply at a
   few MB and lets sequence requests start after the first reply instead of the last.
2. POST sequence/id (type=protein) with the gene IDs that have wanted translations, at
   most 50 per request: one request returns every translation of those genes. Ids the
   server drops are asked for once more by protein ID; what is still missing is recorded
   on the record (missing_protein_ids), never silently lost.

For 2000 genes that is 20 lookups + at most 40 sequence requests. lookup/symbol matches
the display label exactly, so symbols it misses are asked once more in the human (CD3E)
and mouse (Cd3e) spellings, with a warning when that is what matched.

3. Symbols still missed (an outdated name: SEPT5, KIAA0101) are looked up by synonym
   (`synonyms=True`, the default): one GET xrefs/symbol/{species}/{symbol}
   ?object_type=gene&external_db=HGNC (MGI for mouse) each, through the same limiter,
   pause and retries, once every lookup/symbol has answered; then one POST lookup/id for
   all the genes those name and the usual sequence requests, shared by all misses. The
   rule that picks the gene, or reports it ambiguous or a duplicate, is
   sources/synonyms.py's. Spreadsheet dates (7-Sep) and clone names (RP11-...) are never
   looked up. 80 misses cost 80 + 1 + 2 requests.

With isoforms_set="canonical", step 2 asks for each gene's canonical translation by its
protein ID (parse.canonical_record), still one request per 50 genes, and the records are
marked as holding that isoform only (sources/isoform_sets.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlencode

import aiohttp

from esm2_batch.errors import (
    EnsemblError,
    EnsemblRequestError,
    EnsemblResponseError,
    EnsemblUnavailableError,
)
from esm2_batch.records import (
    GeneIsoforms,
    IsoformsSet,
    MatchedBy,
    is_ensembl_gene_id,
    query_key,
)
from esm2_batch.sources.base import SourceOptions
from esm2_batch.sources.ensembl_rest.parse import (
    GeneRecord,
    ambiguous,
    build_gene,
    canonical_record,
    duplicate,
    index_sequences,
    no_protein,
    not_found,
    parse_gene,
    parse_xrefs,
)
from esm2_batch.sources.ensembl_rest.transport import JsonTransport, RetryPolicy
from esm2_batch.sources.gene_lists import as_duplicates, dedupe
from esm2_batch.sources.isoform_sets import canonical_only
from esm2_batch.sources.synonyms import (
    Candidate,
    DuplicateGuard,
    choose,
    is_primary_region,
    synonym_db,
    worth_a_lookup,
)

log = logging.getLogger("esm2_batch.sources.ensembl_rest")
T = TypeVar("T")

DEFAULT_BASE_URL = "https://rest.ensembl.org"
DEFAULT_BIOTYPES: tuple[str, ...] = ("protein_coding",)
MAX_LOOKUP_IDS = 1000
MAX_SEQUENCE_IDS = 50
Lookup = Literal["id", "symbol"]
Pending = tuple[str, GeneRecord, MatchedBy]


def resolve_base_url(base_url: str | None) -> str:
    """The argument, else $ENSEMBL_REST_URL, else the public server."""
    return (base_url or os.environ.get("ENSEMBL_REST_URL") or DEFAULT_BASE_URL).rstrip("/")


class EnsemblClient:
    """Async Ensembl REST client: one aiohttp session, one rate limiter, one pause gate.

    Use as ``async with EnsemblClient(...) as client:``; then ``await
    client.fetch_isoforms(queries)`` (input order) or ``async for gene in
    client.iter_isoforms(queries)`` (as each gene's sequences arrive).
    """

    def __init__(
        self,
        *,
        species: str = "homo_sapiens",
        base_url: str | None = None,
        rate_limit: float = 10.0,
        parallel_workers: int = 10,
        biotypes: Iterable[str] = DEFAULT_BIOTYPES,
        timeout: float = 60.0,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        lookup_chunk_size: int = 100,
        sequence_chunk_size: int = MAX_SEQUENCE_IDS,
        session: aiohttp.ClientSession | None = None,
        synonyms: bool = True,
        isoforms_set: IsoformsSet = "all",
    ) -> None:
        if not 1 <= lookup_chunk_size <= MAX_LOOKUP_IDS:
            raise ValueError(f"lookup_chunk_size must be 1..{MAX_LOOKUP_IDS}")
        if not 1 <= sequence_chunk_size <= MAX_SEQUENCE_IDS:
            raise ValueError(f"sequence_chunk_size must be 1..{MAX_SEQUENCE_IDS}")
        self.species = species
        self.base_url = resolve_base_url(base_url)
        self.biotypes = tuple(biotypes)
        self.lookup_chunk_size = lookup_chunk_size
        self.sequence_chunk_size = sequence_chunk_size
        self.synonyms = synonyms
        self.canonical = isoforms_set == "canonical"
        retry = RetryPolicy(max_attempts=max_attempts, backoff_base=backoff_base)
        self.transport = JsonTransport(self.base_url, rate_limit=rate_limit,
                                       parallel_workers=parallel_workers, timeout=timeout,
                                       retry=retry, session=session)

    @property
    def stats(self) -> dict[str, int]:
        """Request counters: requests, per-endpoint requests, n429, retries, slowdowns."""
        return dict(self.transport.stats)

    async def __aenter__(self) -> EnsemblClient:
        await self.transport.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.transport.__aexit__(*exc_info)

    async def release(self) -> int | None:
        """The server's Ensembl release (GET /info/data), or None when it will not say:
        provenance for the output's meta, never a reason to fail a run."""
        try:
            reply = await self.transport.get("/info/data")
        except EnsemblError as exc:
            log.info("Ensembl release unknown (%s)", exc)
            return None
        releases = reply.get("releases") if isinstance(reply, dict) else None
        numbers = [r for r in releases or () if isinstance(r, int)]
        return max(numbers) if numbers else None

    async def fetch_isoforms(self, queries: Iterable[str]) -> list[GeneIsoforms]:
        """One GeneIsoforms per distinct query, in input order; a later spelling of a
        gene asked for earlier (ppbp after PPBP, a symbol after its own ENSG) is a
        duplicate of the first, as esm_all.pt merges it (gene_lists.as_duplicates)."""
        distinct = dedupe(queries).genes
        found = {g.query: g async for g in self.iter_isoforms(distinct)}
        return as_duplicates([found[q] for q in distinct])

    async def iter_isoforms(self, queries: Iterable[str]) -> AsyncIterator[GeneIsoforms]:
        """Yield each distinct query's GeneIsoforms as soon as it is complete.

        Completion order, not input order. An error in any request cancels the rest and
        is raised from the iterator; leaving the loop early cancels the requests too.
        """
        distinct = dedupe(queries).genes
        results: asyncio.Queue[GeneIsoforms | BaseException | None] = asyncio.Queue()
        runner = asyncio.create_task(self._run(distinct, results))
        try:
            while (item := await results.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    async def _run(self, queries: Sequence[str],
                   results: asyncio.Queue[GeneIsoforms | BaseException | None]) -> None:
        ids = [q for q in queries if is_ensembl_gene_id(q)]
        symbols = [q for q in queries if not is_ensembl_gene_id(q)]
        emit = results.put_nowait
        try:
            async with asyncio.TaskGroup() as group:
                misses: list[asyncio.Future[list[str]]] = []
                for chunk in _chunks(ids, self.lookup_chunk_size):
                    group.create_task(self._resolve_chunk("id", chunk, emit))
                for chunk in _chunks(symbols, self.lookup_chunk_size):
                    missed: asyncio.Future[list[str]] | None = None
                    if self.synonyms:
                        missed = asyncio.get_running_loop().create_future()
                        misses.append(missed)
                    group.create_task(self._resolve_chunk("symbol", chunk, emit, missed))
                if misses:
                    group.create_task(self._resolve_synonyms(symbols, misses, emit,
                                                             DuplicateGuard.of(queries)))
        except BaseExceptionGroup as group_error:
            results.put_nowait(_first_error(group_error))
            return
        results.put_nowait(None)

    async def _resolve_chunk(self, kind: Lookup, queries: list[str], emit: Any,
                             missed: asyncio.Future[list[str]] | None = None) -> None:
        """Lookup one chunk, emit what needs no sequence, then fetch the rest's sequences.
        With `missed`, the queries the lookup did not find go there (for the synonym
        step) instead of being emitted as not found."""
        genes = await self._lookup(kind, queries)
        if missed is not None:
            missed.set_result([q for q in queries if q not in genes])
            queries = [q for q in queries if q in genes]
        await self._emit_or_fetch(queries, dict(genes), kind, emit)

    async def _resolve_synonyms(self, symbols: list[str],
                                misses: list[asyncio.Future[list[str]]], emit: Any,
                                guard: DuplicateGuard) -> None:
        """Once every symbol lookup is done: the symbols they missed, by synonym, in input
        order, so their lookup/id and sequence requests are shared by all chunks."""
        missed = {q for chunk in await asyncio.gather(*misses) for q in chunk}
        ordered = [q for q in symbols if q in missed]
        await self._emit_or_fetch(ordered, await self._by_synonym(ordered, guard),
                                  "synonym", emit)

    async def _emit_or_fetch(self, queries: list[str],
                             genes: dict[str, GeneRecord] | dict[str, GeneRecord | GeneIsoforms],
                             matched_by: MatchedBy, emit: Any) -> None:
        """Emit the queries' records that need no sequence; fetch the others' sequences."""
        pending: list[Pending] = []
        for query in queries:
            gene = genes.get(query)
            if gene is None:
                emit(not_found(query))
            elif isinstance(gene, GeneIsoforms):
                emit(gene)  # ambiguous, or a duplicate of another query
            elif not gene.translations:
                emit(no_protein(query, gene, matched_by=matched_by))
            else:  # canonical: only that translation's sequence is asked for
                pending.append((query, canonical_record(gene) if self.canonical else gene,
                                matched_by))
        async with asyncio.TaskGroup() as group:
            for chunk in _chunks(pending, self.sequence_chunk_size):
                group.create_task(self._sequences(chunk, emit))

    async def _by_synonym(self, missed: list[str], guard: DuplicateGuard
                          ) -> dict[str, GeneRecord | GeneIsoforms]:
        """Missed symbols -> the gene each names as a synonym (GeneRecord), or a final
        record (ambiguous, duplicate); symbols that name no gene are left out."""
        asked = [q for q in missed if worth_a_lookup(q)]
        if not asked:
            return {}
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._xrefs(q)) for q in asked]
        named = {q: t.result() for q, t in zip(asked, tasks, strict=True)}
        records = await self._lookup_ids(list(dict.fromkeys(i for ids in named.values()
                                                            for i in ids)), asked)
        out: dict[str, GeneRecord | GeneIsoforms] = {}
        for query, gene_ids in named.items():
            found = [records[g] for g in gene_ids if g in records]
            choice = choose(Candidate(g.gene_id, g.symbol, is_primary_region(g.region),
                                      bool(g.translations)) for g in found)
            if isinstance(choice, list):
                out[query] = ambiguous(query, [(c.gene_id, c.symbol) for c in choice])
            elif choice is not None:
                gene = next(g for g in found if g.gene_id == choice.gene_id)
                other = guard.claim(query, gene.gene_id, gene.symbol)
                out[query] = duplicate(query, gene, other) if other else gene
                log.info("%s: found under its current name %s (%s)", query, gene.symbol,
                         gene.gene_id)
        return out

    async def _xrefs(self, symbol: str) -> list[str]:
        """The Ensembl gene IDs a symbol is linked to (display name, synonym or external
        reference); a symbol the server refuses (HTTP 400) names none."""
        params = {"object_type": "gene"}
        db = synonym_db(self.species)
        if db is not None:
            params["external_db"] = db
        path = (f"/xrefs/symbol/{quote(self.species, safe='')}/{quote(symbol, safe='')}"
                f"?{urlencode(params)}")
        try:
            reply = await self.transport.post(path, None, queries=[symbol])
        except EnsemblRequestError as exc:
            log.info("%s: no synonym lookup (%s)", symbol, exc)
            return []
        return parse_xrefs(reply, path="/xrefs/symbol")

    async def _lookup_ids(self, gene_ids: list[str], queries: list[str]
                          ) -> dict[str, GeneRecord]:
        """lookup/id (expand) of gene IDs, keyed by the ID as sent; unknown ones left out."""
        found: dict[str, GeneRecord] = {}
        for chunk in _chunks(gene_ids, MAX_LOOKUP_IDS):
            found.update(await self._lookup_keys("/lookup/id", "ids", {g: g for g in chunk},
                                                 queries))
        return found

    async def _lookup(self, kind: Lookup, queries: list[str]) -> dict[str, GeneRecord]:
        if kind == "id":
            keys = {query_key(q): q for q in queries}
            return await self._lookup_keys("/lookup/id", "ids", keys, queries)
        path = f"/lookup/symbol/{self.species}"
        found = await self._lookup_keys(path, "symbols", {q: q for q in queries}, queries)
        retry = {variant: q for q in queries if q not in found
                 for variant in _case_variants(q)}
        if retry:  # lookup/symbol is case-sensitive: Cd3e, CD3E and cd3e are not one key
            again = await self._lookup_keys(path, "symbols", retry, queries)
            for query, gene in again.items():
                log.warning("%s: matched Ensembl symbol %s only ignoring case", query,
                            gene.symbol)
                found[query] = gene
        return found

    async def _lookup_keys(self, path: str, field: str, keys: dict[str, str],
                           queries: list[str]) -> dict[str, GeneRecord]:
        """POST `keys` (sent key -> query) and parse the genes the reply holds."""
        reply = await self.transport.post(path, {field: list(keys), "expand": 1},
                                          queries=queries)
        if not isinstance(reply, dict):
            raise EnsemblResponseError(f"{path}: expected a JSON object", queries=queries)
        folded = {str(k).upper(): v for k, v in reply.items()}
        out: dict[str, GeneRecord] = {}
        for key, query in keys.items():
            record = reply[key] if key in reply else folded.get(key.upper())
            gene = parse_gene(record, biotypes=self.biotypes)
            if gene is not None and query not in out:
                out[query] = gene
        return out

    async def _sequences(self, chunk: list[Pending], emit: Any) -> None:
        """Fetch every wanted translation of a chunk of genes, joined on (query, id)."""
        queries = [q for q, _, _ in chunk]
        gene_ids = list(dict.fromkeys(g.gene_id for _, g, _ in chunk))
        body: dict[str, Any] = {"ids": gene_ids, "type": "protein", "multiple_sequences": 1}
        if self.canonical:  # by protein ID: the other translations are never sent
            body = {"ids": [t.protein_id for _, g, _ in chunk for t in g.translations],
                    "type": "protein"}
        index = index_sequences(await self.transport.post("/sequence/id", body,
                                                          queries=queries))
        found = {pid: seq for (gid, pid), seq in index.items()}
        missing = [t.protein_id for _, g, _ in chunk for t in g.translations
                   if ((t.protein_id if self.canonical else g.gene_id).upper(),
                       t.protein_id) not in index]
        if missing:
            found.update(await self._sequences_by_protein(missing, queries))
        for query, gene, matched_by in chunk:
            built = build_gene(query, gene, found, matched_by=matched_by)
            emit(canonical_only(built) if self.canonical else built)

    async def _sequences_by_protein(self, protein_ids: list[str],
                                    queries: list[str]) -> dict[str, str]:
        """Second chance for translations the gene-level request left out."""
        found: dict[str, str] = {}
        for chunk in _chunks(list(dict.fromkeys(protein_ids)), self.sequence_chunk_size):
            body = {"ids": chunk, "type": "protein"}
            reply = await self.transport.post("/sequence/id", body, queries=queries)
            found.update({pid: seq for (q, pid), seq in index_sequences(reply).items()
                          if q == pid.upper() or q == pid})
        return found


def _case_variants(symbol: str) -> list[str]:
    """Human (CD3E) and mouse/rat (Cd3e) spellings of a symbol, other than itself."""
    return [v for v in dict.fromkeys((symbol.upper(), symbol.capitalize())) if v != symbol]


def _first_error(error: BaseException) -> BaseException:
    """The first real exception inside (nested) task-group exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def fetch_isoforms(
    queries: Iterable[str],
    *,
    species: str = "homo_sapiens",
    base_url: str | None = None,
    rate_limit: float = 10.0,
    parallel_workers: int = 10,
    biotypes: Iterable[str] = DEFAULT_BIOTYPES,
    synonyms: bool = True,
) -> list[GeneIsoforms]:
    """Synchronous convenience: one GeneIsoforms per distinct query, in input order
    (later spellings of one gene are duplicates of the first: EnsemblClient.fetch_isoforms).

    `synonyms`: look symbols Ensembl does not know as current names up as previous names
    and aliases (SEPT5 -> SEPTIN5; GeneIsoforms.matched_by says "synonym"); False keeps
    strict matching.

    Runs its own event loop; from inside a running loop (Jupyter) it uses a worker
    thread, since asyncio.run refuses to nest.
    """
    queries = list(queries)

    async def main() -> list[GeneIsoforms]:
        async with EnsemblClient(species=species, base_url=base_url, rate_limit=rate_limit,
                                 parallel_workers=parallel_workers,
                                 biotypes=biotypes, synonyms=synonyms) as client:
            return await client.fetch_isoforms(queries)

    return run_sync(main)


def run_sync(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run(main()), also when called from a thread that already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


class EnsemblRestSource:
    """An IsoformSource (sources/base.py) over Ensembl REST: one client, one rate limiter
    for the whole stream, and the server's release asked once for the provenance."""

    def __init__(self, options: SourceOptions) -> None:
        self.options = options
        self.release: int | None = None

    async def stream(self, queries: Sequence[str]) -> AsyncIterator[GeneIsoforms]:
        options = self.options
        async with EnsemblClient(species=options.species, base_url=options.ensembl_url,
                                 rate_limit=options.rate_limit,
                                 parallel_workers=options.parallel_workers,
                                 biotypes=options.biotypes, synonyms=options.synonyms,
                                 isoforms_set=options.isoforms_set) as client:
            self.release = await client.release()
            async for gene in client.iter_isoforms(queries):
                yield gene

    def provenance(self) -> dict[str, str | int]:
        found: dict[str, str | int] = {"isoform_source": "ensembl-rest",
                                       "ensembl_url": resolve_base_url(self.options.ensembl_url)}
        if self.release is not None:
            found["ensembl_release"] = self.release
        return found

    def describe(self) -> str | None:
        return None

    def known_queries(self) -> Sequence[str] | None:
        return None

    def all_genes(self) -> Sequence[str] | None:
        return None  # REST cannot list a proteome cheaply: --all_genes needs the files

    def unreachable(self) -> str | None:
        """One GET /info/data; only a server that cannot be reached counts (a 404 from a
        mirror without /info is still a server)."""
        async def probe() -> str | None:
            async with EnsemblClient(species=self.options.species,
                                     base_url=self.options.ensembl_url,
                                     rate_limit=self.options.rate_limit) as client:
                try:
                    await client.transport.get("/info/data")
                except EnsemblUnavailableError as exc:
                    return str(exc)
                except EnsemblError:
                    return None
            return None

        return run_sync(probe)
