"""A fake Ensembl REST server on 127.0.0.1, speaking the real API's shapes and limits.

Shaped on the real replies in tests/fixtures/ensembl/ (BRAF, release 94):

- POST /lookup/id {"ids", "expand"}: dict keyed by the id as sent, null for unknown ids;
  more than 1000 ids -> 400 {"error": ...}.
- POST /lookup/symbol/{species} {"symbols", "expand"}: unknown symbols left out.
- GET /xrefs/symbol/{species}/{symbol}?object_type=gene[&external_db=HGNC]: a list of
  {"type": "gene", "id": ...} for every gene whose symbol or synonym (FakeGene.synonyms,
  matched ignoring case) it is, patch copies included, [] when unknown; without
  object_type, the genes' transcripts follow as {"type": "transcript", ...} (shaped on the
  real BRCA2 reply in tests/fixtures/ensembl/xrefs_symbol_BRCA2.json).
- POST /sequence/id {"ids", "type": "protein"}: a list of {query, id, version, seq,
  molecule, desc}; a gene id returns every translation; more than 50 ids -> 400; proteins
  in `drop_ids` are silently left out, as Ensembl does with failures: only the first time
  each is asked for (`drop_once=True`, a transient failure the client's second request
  recovers) or on every request (`drop_once=False`, a persistent one).
- A token-bucket rate limit answering 429 with fractional Retry-After and the
  X-RateLimit-* headers; latency plus transfer time; faults injected on demand
  (status codes, HTML bodies, stalls, connection resets); per-endpoint request counts.

Usable from async tests (`await fake.start()`) and from sync code or subprocess tests
(`with fake.running_in_thread() as url:`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ensembl"
AMINO = "ACDEFGHIKLMNPQRSTVWY"
# random bytes -> amino acids in one C call (a Python loop per residue made the synthetic
# proteomes most of some tests' time); 256 is not a multiple of 20, a bias no test minds
_TO_AMINO = bytes(ord(AMINO[i % len(AMINO)]) for i in range(256))


@dataclass
class FakeTranscript:
    transcript_id: str
    biotype: str
    is_canonical: bool
    protein_id: str | None = None
    sequence: str | None = None


@dataclass
class FakeGene:
    gene_id: str
    symbol: str
    transcripts: list[FakeTranscript]
    version: int = 1
    synonyms: list[str] = field(default_factory=list)  # previous symbols and aliases
    region: str = "1"                                   # seq_region_name; CHR_* = patch

    def lookup_record(self, species: str = "homo_sapiens") -> dict[str, Any]:
        """The expand=1 lookup value, with exons padded to a realistic size."""
        return {
            "id": self.gene_id, "version": self.version, "display_name": self.symbol,
            "object_type": "Gene", "biotype": "protein_coding", "species": species,
            "seq_region_name": self.region,
            "Transcript": [_transcript_record(self, t) for t in self.transcripts],
        }


def _transcript_record(gene: FakeGene, t: FakeTranscript) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": t.transcript_id, "version": 1, "Parent": gene.gene_id, "biotype": t.biotype,
        "is_canonical": int(t.is_canonical), "object_type": "Transcript",
        "Exon": [{"id": f"ENSE{i:011d}", "start": 1000 * i, "end": 1000 * i + 150,
                  "object_type": "Exon"} for i in range(4)],
    }
    if t.protein_id is not None:
        record["Translation"] = {"id": t.protein_id, "Parent": t.transcript_id,
                                 "length": len(t.sequence or ""), "object_type": "Translation"}
    return record


def braf() -> FakeGene:
    """BRAF exactly as the real release-94 fixtures describe it."""
    lookup = json.loads((FIXTURES / "lookup_id_expand_BRAF_e94.json").read_text())
    seqs = {s["id"]: s["seq"] for s in
            json.loads((FIXTURES / "sequence_id_protein_BRAF_e94.json").read_text())}
    transcripts = []
    for tx in lookup["Transcript"]:
        protein = (tx.get("Translation") or {}).get("id")
        transcripts.append(FakeTranscript(tx["id"], tx["biotype"], bool(tx["is_canonical"]),
                                          protein, seqs.get(protein) if protein else None))
    return FakeGene(lookup["id"], lookup["display_name"], transcripts, lookup["version"])


def synthetic_genes(n: int, *, coding: int = 6, nmd: int = 1, noncoding_every: int = 0,
                    seed: int = 0, start: int = 1) -> list[FakeGene]:
    """n genes named GENE0001.. with `coding` protein_coding isoforms (one canonical) and
    `nmd` NMD isoforms; every `noncoding_every`-th gene has no translation at all.
    Lengths follow a log-normal with median about 400 residues."""
    rng = random.Random(seed)
    genes = []
    for i in range(start, start + n):
        gid = f"ENSG{900000000 + i:011d}"
        if noncoding_every and i % noncoding_every == 0:
            txs = [FakeTranscript(f"ENST{900000000 + i * 100:011d}", "lncRNA", True)]
        else:
            txs = [_synthetic_tx(i, k, "protein_coding" if k < coding
                                 else "nonsense_mediated_decay", k == 0, rng)
                   for k in range(coding + nmd)]
        genes.append(FakeGene(gid, f"GENE{i:04d}", txs))
    return genes


def _synthetic_tx(gene: int, k: int, biotype: str, canonical: bool,
                  rng: random.Random) -> FakeTranscript:
    length = max(30, min(4000, int(rng.lognormvariate(6.0, 0.6))))
    seq = "M" + rng.randbytes(length - 1).translate(_TO_AMINO).decode()
    return FakeTranscript(f"ENST{900000000 + gene * 100 + k:011d}", biotype, canonical,
                          f"ENSP{900000000 + gene * 100 + k:011d}", seq)


@dataclass
class Fault:
    """Answer the next `times` requests to `endpoint` ("lookup", "sequence", "xrefs" or "any")
    with `kind`: an HTTP status (int), "html" (a 200 HTML page), "stall" (no reply until
    the server stops, long past the client's timeout) or "reset" (close the connection).
    With `hold`, a status reply sends its status line and headers at once and its body
    only once `hold` is set (a slow network: the client reads the status long before)."""

    endpoint: str
    kind: int | str
    times: int = 1
    retry_after: float | None = None
    hold: asyncio.Event | None = None


@dataclass
class FakeEnsembl:
    genes: list[FakeGene]
    rate_limit: float | None = None           # requests per second (token bucket)
    burst: float | None = None                # bucket size; default = rate_limit
    retry_after_extra: float = 0.0
    latency: float = 0.0                      # seconds before each reply
    bandwidth: float | None = None            # reply bytes per second
    hourly_limit: int = 55000
    release: int | None = 114                 # GET /info/data; None answers 404
    reset_seconds: float = 3600.0             # X-RateLimit-Reset
    stall_seconds: float = 5.0
    max_lookup: int = 1000
    max_sequence: int = 50
    drop_ids: set[str] = field(default_factory=set)          # dropped from sequence replies
    drop_once: bool = True                    # True: transient; False: dropped every time
    faults: list[Fault] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    bodies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_id = {g.gene_id: g for g in self.genes}
        primary_last = sorted(self.genes, key=lambda g: not g.region.startswith("CHR_"))
        self._by_symbol = {g.symbol: g for g in primary_last}
        self._proteins = {t.protein_id: (g, t) for g in self.genes for t in g.transcripts
                          if t.protein_id}
        self._tokens = self.burst or self.rate_limit or 0.0
        self._last = time.monotonic()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- serving ---------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/lookup/id", self._lookup_id)
        app.router.add_post("/lookup/symbol/{species}", self._lookup_symbol)
        app.router.add_post("/sequence/id", self._sequence_id)
        app.router.add_get("/xrefs/symbol/{species}/{symbol}", self._xrefs_symbol)
        app.router.add_get("/info/data", self._info_data)
        return app

    async def start(self) -> str:
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            self._stopping.set()  # stalled replies end now, not after stall_seconds
            await self._runner.cleanup()

    @contextmanager
    def running_in_thread(self) -> Iterator[str]:
        """Serve from a background thread's event loop (for sync code and subprocesses)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        url = asyncio.run_coroutine_threadsafe(self.start(), loop).result(10)
        try:
            yield url
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    # -- handlers --------------------------------------------------------------------
    async def _info_data(self, request: web.Request) -> web.StreamResponse:
        self.counts["info"] += 1
        if self.release is None:
            return web.json_response({"error": "page not found"}, status=404)
        return web.json_response({"releases": [self.release]})

    async def _lookup_id(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "lookup", "ids", self.max_lookup,
                                  lambda ids: {i: self._gene_record(self._by_id.get(i))
                                               for i in ids})

    async def _lookup_symbol(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "lookup", "symbols", self.max_lookup,
                                  lambda syms: {s: self._gene_record(self._by_symbol[s])
                                                for s in syms if s in self._by_symbol})

    async def _sequence_id(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "sequence", "ids", self.max_sequence,
                                  self._sequences)

    async def _xrefs_symbol(self, request: web.Request) -> web.StreamResponse:
        refused = await self._refuse(request, "xrefs")
        if refused is not None:
            return refused
        symbol = request.match_info["symbol"]
        self.bodies.append(("xrefs", {"symbol": symbol, **request.query}))
        named = [g for g in self.genes
                 if symbol.casefold() in {n.casefold() for n in (g.symbol, *g.synonyms)}]
        found: list[dict[str, str]] = [{"type": "gene", "id": g.gene_id} for g in named]
        if request.query.get("object_type") != "gene":
            found += [{"type": "transcript", "id": t.transcript_id}
                      for g in named for t in g.transcripts]
        await asyncio.sleep(self.latency)
        return web.json_response(found, headers=self._budget_headers())

    async def _refuse(self, request: web.Request, endpoint: str) -> web.StreamResponse | None:
        """Count the request; a 429 or an injected fault when one is due, else None."""
        self.counts["requests"] += 1
        self.counts[endpoint] += 1
        limited = self._rate_limited()
        if limited is not None:
            self.counts["429"] += 1
            return limited
        fault = self._take_fault(endpoint)
        if fault is not None:
            return await self._fault(request, fault)
        return None

    async def _handle(self, request: web.Request, endpoint: str, key: str, limit: int,
                      answer: Any) -> web.StreamResponse:
        refused = await self._refuse(request, endpoint)
        if refused is not None:
            return refused
        body = await request.json()
        self.bodies.append((endpoint, body))
        items = body.get(key)
        if not isinstance(items, list) or len(items) > limit:
            return web.json_response({"error": f"Please limit the number of {key} to "
                                      f"{limit} per request"}, status=400)
        payload = json.dumps(answer(items)).encode()
        await asyncio.sleep(self.latency + (len(payload) / self.bandwidth
                                            if self.bandwidth else 0.0))
        return web.Response(body=payload, content_type="application/json",
                            headers=self._budget_headers())

    def _gene_record(self, gene: FakeGene | None) -> dict[str, Any] | None:
        return None if gene is None else gene.lookup_record()

    def _sequences(self, ids: list[str]) -> list[dict[str, Any]]:
        out = []
        for query in ids:
            for _gene, tx in self._translations_of(query):
                if tx.protein_id in self.drop_ids:
                    if self.drop_once:
                        self.drop_ids.discard(tx.protein_id)
                    continue
                out.append({"query": query, "id": tx.protein_id, "version": 1,
                            "seq": tx.sequence, "molecule": "protein", "desc": None})
        return out

    def _translations_of(self, query: str) -> list[tuple[FakeGene, FakeTranscript]]:
        if query in self._proteins:
            return [self._proteins[query]]
        gene = self._by_id.get(query)
        return [] if gene is None else [(gene, t) for t in gene.transcripts if t.protein_id]

    # -- limits and faults -------------------------------------------------------------
    def _rate_limited(self) -> web.Response | None:
        if not self.rate_limit:
            return None
        now = time.monotonic()
        cap = self.burst or self.rate_limit
        self._tokens = min(cap, self._tokens + (now - self._last) * self.rate_limit)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        wait = (1.0 - self._tokens) / self.rate_limit + self.retry_after_extra
        return web.json_response({"error": "Too many requests"}, status=429, headers={
            "Retry-After": f"{wait:.3f}", **self._budget_headers()})

    def _budget_headers(self) -> dict[str, str]:
        remaining = max(0, self.hourly_limit - self.counts["requests"])
        return {"X-RateLimit-Limit": str(self.hourly_limit),
                "X-RateLimit-Reset": f"{self.reset_seconds:g}", "X-RateLimit-Period": "3600",
                "X-RateLimit-Remaining": str(remaining)}

    def _take_fault(self, endpoint: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.endpoint in (endpoint, "any"):
                fault.times -= 1
                self.counts[f"fault {fault.kind}"] += 1
                return fault
        return None

    async def _fault(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault.kind == "stall":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.stall_seconds)
            return web.json_response({})
        if fault.kind == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if fault.kind == "html":
            return web.Response(text="<html><body>Service maintenance</body></html>",
                                content_type="text/html")
        status = int(fault.kind)
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
        if status == 400:
            return web.json_response({"error": "bad request from fault"}, status=400)
        if fault.hold is None:
            return web.Response(text=f"<html>{status} error</html>", status=status,
                                content_type="text/html", headers=headers)
        body = f"<html>{status} error</html>".encode()
        reply = web.StreamResponse(status=status, headers=headers)
        reply.content_type, reply.content_length = "text/html", len(body)
        await reply.prepare(request)  # the status line and headers go out now
        await fault.hold.wait()
        await reply.write(body)
        await reply.write_eof()
        return reply


def _retired(symbol: str) -> bool:
    """hg19-era clone names (RP11-..., AC147651.3) that current Ensembl does not know."""
    return "." in symbol or symbol.split("-")[0] in {"RP11", "RP5", "RP4", "RP3", "RP1",
                                                     "CTD", "CTC", "CTA", "CTB"}


def genes_for_symbols(symbols: list[str], *, coding: int = 6, nmd: int = 1,
                      seed: int = 0) -> list[FakeGene]:
    """A table serving real gene symbols with synthetic isoforms; retired clone names
    are left out (so they come back not_found, as on the real server)."""
    genes = []
    for number, symbol in enumerate(s for s in symbols if not _retired(s)):
        (gene,) = synthetic_genes(1, coding=coding, nmd=nmd, seed=seed + number,
                                  start=number + 1)
        gene.symbol = symbol
        genes.append(gene)
    return genes


def renamed(genes: list[FakeGene], renames: dict[str, str]) -> list[FakeGene]:
    """Give genes their current names: a gene symbolled with a key of `renames` (an
    outdated name, SEPT5) is renamed to its value (SEPTIN5) and keeps the old name as a
    synonym, as HGNC and Ensembl do. Changes the genes in place; returns them."""
    for gene in genes:
        if gene.symbol in renames:
            gene.synonyms.append(gene.symbol)
            gene.symbol = renames[gene.symbol]
    return genes


Start = Callable[..., Awaitable[FakeEnsembl]]
"""start(genes=None, **FakeEnsembl options) -> a running fake server."""


@asynccontextmanager
async def started_servers(default: Callable[[], list[FakeGene]]) -> AsyncIterator[Start]:
    """Start fake servers in the running loop on demand (`default()` genes unless told
    otherwise); every one is stopped afterwards, whatever the test did."""
    started: list[FakeEnsembl] = []

    async def start(genes: list[FakeGene] | None = None, **options: Any) -> FakeEnsembl:
        fake = FakeEnsembl(genes if genes is not None else default(), **options)
        await fake.start()
        started.append(fake)
        return fake

    try:
        yield start
    finally:
        for fake in started:
            await fake.stop()
