"""The Ensembl fetcher against a fake server on loopback: order, statuses, faults, limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from esm2_batch import fetch_isoforms
from esm2_batch.errors import (
    EnsemblRequestError,
    EnsemblResponseError,
    EnsemblUnavailableError,
)
from esm2_batch.sources.ensembl_rest import (
    EnsemblClient,
    JsonTransport,
    PauseGate,
    RetryPolicy,
)
from esm2_batch.sources.ensembl_rest.parse import index_sequences, parse_gene
from tests.fakes.ensembl import (
    FIXTURES,
    FakeEnsembl,
    FakeGene,
    Fault,
    Start,
    braf,
    started_servers,
    synthetic_genes,
)

BRAF_CANONICAL = "ENSP00000493543"
BRAF_CODING = ["ENSP00000493543", "ENSP00000496776", "ENSP00000288602", "ENSP00000419060",
               "ENSP00000495858"]  # canonical, then 807, 806, 767, 172 residues
NMD = ("protein_coding", "nonsense_mediated_decay")

@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    """Start fake servers in the test's loop; stop them afterwards."""
    async with started_servers(lambda: [braf(), *synthetic_genes(20)]) as start:
        yield start


def client(fake: FakeEnsembl, **options: object) -> EnsemblClient:
    defaults: dict[str, object] = {"rate_limit": 1000, "backoff_base": 0.001}
    return EnsemblClient(base_url=fake.url, **{**defaults, **options})


# -- parsing the real fixtures -------------------------------------------------------------
def test_parse_real_braf_lookup_keeps_protein_coding_only() -> None:
    record = json.loads((FIXTURES / "lookup_id_expand_BRAF_e94.json").read_text())
    coding = parse_gene(record, biotypes=("protein_coding",))
    everything = parse_gene(record, biotypes=NMD)
    assert coding is not None and everything is not None
    assert sorted(t.protein_id for t in coding.translations) == sorted(BRAF_CODING)
    assert len(everything.translations) == 11
    assert [t.protein_id for t in coding.translations if t.is_canonical] == [BRAF_CANONICAL]


def test_parse_null_and_non_gene_records() -> None:
    assert parse_gene(None, biotypes=NMD) is None
    assert parse_gene({"id": "ENST1", "object_type": "Transcript"}, biotypes=NMD) is None


def test_index_sequences_joins_on_query_and_id() -> None:
    reply = json.loads((FIXTURES / "sequence_id_protein_BRAF_e94.json").read_text())
    index = index_sequences(reply)
    assert len(index) == 11
    assert len(index[("ENSG00000157764", BRAF_CANONICAL)]) == 766
    with pytest.raises(EnsemblResponseError):
        index_sequences({"error": "x"})


# -- what users see ------------------------------------------------------------------------
def test_sync_fetch_braf_canonical_first_then_longest() -> None:
    fake = FakeEnsembl([braf()])
    with fake.running_in_thread() as url:
        (gene,) = fetch_isoforms(["BRAF"], base_url=url, rate_limit=100)
    assert gene.status == "ok" and gene.query == "BRAF"
    assert gene.gene_id == "ENSG00000157764" and gene.symbol == "BRAF"
    assert [i.protein_id for i in gene.isoforms] == BRAF_CODING
    assert gene.isoforms[0].is_canonical and gene.canonical is gene.isoforms[0]
    assert len(gene.isoforms[0].sequence) == 766
    assert all(i.biotype == "protein_coding" and i.gene_id == gene.gene_id
               for i in gene.isoforms)


def test_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeEnsembl([braf()])
    with fake.running_in_thread() as url:
        monkeypatch.setenv("ENSEMBL_REST_URL", url)
        (gene,) = fetch_isoforms(["BRAF"], rate_limit=100)
    assert gene.status == "ok"


async def test_sync_fetch_works_inside_a_running_loop() -> None:
    fake = FakeEnsembl([braf()])
    with fake.running_in_thread() as url:
        (gene,) = fetch_isoforms(["BRAF"], base_url=url, rate_limit=100)
    assert gene.isoforms[0].protein_id == BRAF_CANONICAL


async def test_nmd_only_on_request(serve: Start) -> None:
    fake = await serve()
    async with client(fake, biotypes=NMD) as c:
        (gene,) = await c.fetch_isoforms(["BRAF"])
    assert len(gene.isoforms) == 11 and gene.isoforms[0].protein_id == BRAF_CANONICAL
    assert {i.biotype for i in gene.isoforms} == set(NMD)


async def test_symbols_and_versioned_ids_mixed_in_input_order(serve: Start) -> None:
    fake = await serve()
    queries = ["GENE0003", "ENSG00000157764.13", "ENSG00900000005", "GENE0001"]
    async with client(fake) as c:
        genes = await c.fetch_isoforms(queries)
    assert [g.query for g in genes] == queries
    assert [g.gene_id for g in genes] == ["ENSG00900000003", "ENSG00000157764",
                                          "ENSG00900000005", "ENSG00900000001"]
    assert all(g.status == "ok" and g.isoforms[0].is_canonical for g in genes)
    assert {b["ids"][0] for e, b in fake.bodies if e == "lookup" and "ids" in b} <= {
        "ENSG00000157764", "ENSG00900000005"}


async def test_unknown_queries_and_genes_without_protein(serve: Start) -> None:
    fake = await serve([braf(), *synthetic_genes(4, noncoding_every=2)])
    queries = ["NOT_A_GENE", "ENSG00000000001", "GENE0002", "BRAF", "RP11-34P13.7"]
    async with client(fake) as c:
        genes = await c.fetch_isoforms(queries)
    assert [g.status for g in genes] == ["not_found", "not_found", "no_protein", "ok",
                                         "not_found"]
    assert genes[2].gene_id == "ENSG00900000002" and genes[2].isoforms == ()


async def test_duplicates_are_fetched_and_returned_once(serve: Start) -> None:
    fake = await serve()
    async with client(fake) as c:
        genes = await c.fetch_isoforms(["BRAF", "BRAF", "ENSG00000157764",
                                        "ENSG00000157764.13", "GENE0001"])
    assert [g.query for g in genes] == ["BRAF", "ENSG00000157764", "GENE0001"]


async def test_iter_isoforms_yields_each_query_once(serve: Start) -> None:
    fake = await serve()
    queries = [f"GENE{i:04d}" for i in range(1, 21)] + ["BRAF", "NOPE"]
    async with client(fake, lookup_chunk_size=5, sequence_chunk_size=3) as c:
        seen = [g.query async for g in c.iter_isoforms(queries)]
    assert sorted(seen) == sorted(queries)


async def test_2000_genes_in_at_most_100_requests_none_oversized(serve: Start) -> None:
    genes = synthetic_genes(2000, coding=2, nmd=1, noncoding_every=50)
    fake = await serve(genes, max_lookup=1000, max_sequence=50)
    queries = [g.symbol for g in genes]
    async with client(fake, parallel_workers=10) as c:
        result = await c.fetch_isoforms(queries)
        stats = c.stats
    assert [g.query for g in result] == queries
    assert sum(g.status == "ok" for g in result) == 1960
    assert all(len(g.isoforms) == 2 for g in result if g.status == "ok")  # NMD left out
    assert fake.counts["requests"] <= 100 and stats["requests"] == fake.counts["requests"]
    assert fake.counts["lookup"] == 20 and fake.counts["sequence"] == 40
    assert all(len(b.get("ids", b.get("symbols", []))) <= (1000 if e == "lookup" else 50)
               for e, b in fake.bodies)


# -- faults --------------------------------------------------------------------------------
async def test_429_storm_loses_no_gene(serve: Start) -> None:
    genes = synthetic_genes(300)
    fake = await serve(genes, rate_limit=40, burst=1)
    async with client(fake, lookup_chunk_size=25, sequence_chunk_size=10,
                      parallel_workers=10) as c:
        result = await c.fetch_isoforms([g.symbol for g in genes])
        stats = c.stats
    assert fake.counts["429"] > 5 and stats["n429"] == fake.counts["429"]
    assert all(g.status == "ok" and len(g.isoforms) == 6 for g in result)


class Timeline:
    """What happened, in order, on a fake clock that moves only when the transport's
    pause sleeps: requests as the client sends them (past the pause gate), a 429 as the
    client reads its status line, and whatever a test's fake server adds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[tuple[str, float]] = []
        self.listeners: list[Callable[[str], None]] = []

    def add(self, what: str) -> None:
        self.events.append((what, self.now))
        for listener in self.listeners:
            listener(what)

    def saw(self, what: str) -> bool:
        return any(event == what for event, _ in self.events)

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        await asyncio.sleep(0)  # let the other tasks run, as a real sleep would
        self.now = max(self.now, until)  # overlapping sleeps overlap

    def after(self, first: str, what: str) -> tuple[float, list[float]]:
        """When `first` happened, and when each `what` after it did."""
        i = next(i for i, (event, _) in enumerate(self.events) if event == first)
        return self.events[i][1], [t for event, t in self.events[i + 1:] if event == what]


async def twenty_sequence_requests(fake: FakeEnsembl, timeline: Timeline,
                                   on_429: Callable[[], Awaitable[None]]) -> int:
    """20 sequence requests at once through one transport, and one more sent once the
    client has read a 429's status line (after `on_429`, a slow client); the number of
    429s the client saw."""
    genes = synthetic_genes(21)
    late: list[asyncio.Future[Any]] = []

    async def sent(*_: object) -> None:
        timeline.add("sent")

    async def read(_s: object, _c: object, params: aiohttp.TraceRequestEndParams) -> None:
        if params.response.status == 429:
            await on_429()
            timeline.add("429 read")
            late.append(asyncio.ensure_future(post(genes[20])))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(sent)
    trace.on_request_end.append(read)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session, JsonTransport(
            fake.url, rate_limit=1000, session=session, clock=lambda: timeline.now,
            sleep=timeline.sleep) as transport:
        def post(gene: FakeGene) -> Awaitable[Any]:
            body = {"ids": [gene.gene_id], "type": "protein"}
            return transport.post("/sequence/id", body, queries=[gene.symbol])

        replies = await asyncio.gather(*map(post, genes[:20]))
        replies += await asyncio.gather(*late)
    assert len(replies) == 21 and all(replies)
    return transport.stats["n429"]


async def test_429_pauses_every_request_sent_after_it_was_read(serve: Start) -> None:
    # The 429's body comes only once a request was sent after its status line was read: a
    # client that paused on the body, not the status, let that request through the pause.
    hold = asyncio.Event()
    fake = await serve(synthetic_genes(21),
                       faults=[Fault("sequence", 429, retry_after=0.3, hold=hold)])
    timeline = Timeline()

    def release(what: str) -> None:
        if what == "sent" and timeline.saw("429 read"):
            hold.set()

    timeline.listeners.append(release)
    assert await twenty_sequence_requests(fake, timeline, lambda: asyncio.sleep(0)) == 1
    read_at, sent_after = timeline.after("429 read", "sent")
    assert len(sent_after) >= 2  # the late one and the retry, at least
    assert min(sent_after) >= read_at + 0.3  # every one waited for the pause


async def test_a_request_sent_before_the_429_was_read_may_arrive_after_it(
        serve: Start) -> None:
    # What the wall-clock version of the test above tripped on (a request reached the fake
    # 1.7 ms after the 429): here the client reads the 429 only once another request has
    # reached the server after the 429 went out. That request had left before the client
    # knew; no client can call it back. Every one sent after the read still waits.
    fake = await serve(synthetic_genes(21), faults=[Fault("sequence", 429, retry_after=0.3)])
    timeline = Timeline()
    arrived_late = asyncio.Event()
    refuse = fake._refuse

    async def logged(request: web.Request, endpoint: str) -> web.StreamResponse | None:
        timeline.add("arrived")
        if timeline.saw("429 answered"):
            arrived_late.set()
        refused = await refuse(request, endpoint)
        if refused is not None and refused.status == 429:
            timeline.add("429 answered")
        return refused

    fake._refuse = logged  # type: ignore[method-assign]
    assert await twenty_sequence_requests(fake, timeline, arrived_late.wait) == 1
    answered_at, arrived = timeline.after("429 answered", "arrived")
    read_at, sent_after = timeline.after("429 read", "sent")
    assert min(arrived) < answered_at + 0.3  # "during the pause", by the server's clock
    assert sent_after and min(sent_after) >= read_at + 0.3


async def test_pause_gate_with_a_fake_clock() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    gate = PauseGate(clock=lambda: now[0], sleep=sleep)
    gate.pause_for(1.5)
    gate.pause_for(0.5)  # a shorter pause never cuts a longer one short
    await gate.wait()
    assert slept == [1.5] and now[0] == 101.5


def test_backoff_is_bounded_full_jitter() -> None:
    import random

    policy = RetryPolicy(backoff_base=0.5, backoff_max=4.0)
    rng = random.Random(0)
    delays = [policy.backoff(attempt, rng) for attempt in range(1, 10) for _ in range(50)]
    assert min(delays) >= 0 and max(delays) <= 4.0


async def test_5xx_bursts_html_and_resets_are_retried(serve: Start) -> None:
    faults = [Fault("lookup", 502, times=2), Fault("sequence", 503, times=2),
              Fault("sequence", "html"), Fault("lookup", "reset"), Fault("sequence", 504)]
    fake = await serve(faults=faults)
    async with client(fake) as c:
        genes = await c.fetch_isoforms(["BRAF", "GENE0001"])
        stats = c.stats
    assert [len(g.isoforms) for g in genes] == [5, 6]
    assert stats["retries"] == 7


async def test_timeouts_are_retried(serve: Start) -> None:
    fake = await serve(faults=[Fault("sequence", "stall")], stall_seconds=60)
    async with client(fake, timeout=0.5) as c:  # replies take ms: 0.5 s is a wide margin
        (gene,) = await c.fetch_isoforms(["BRAF"])
        stats = c.stats
    assert gene.status == "ok" and fake.counts["fault stall"] == 1 and stats["retries"] >= 1


async def test_giving_up_names_the_genes(serve: Start) -> None:
    fake = await serve(faults=[Fault("sequence", 500, times=99)])
    async with client(fake, max_attempts=3) as c:
        with pytest.raises(EnsemblUnavailableError, match=r"3 attempts.*GENE0002"):
            await c.fetch_isoforms(["GENE0001", "GENE0002"])
    assert fake.counts["sequence"] == 3


async def test_400_is_never_retried(serve: Start) -> None:
    fake = await serve(faults=[Fault("lookup", 400, times=5)])
    async with client(fake) as c:
        with pytest.raises(EnsemblRequestError, match="bad request from fault"):
            await c.fetch_isoforms(["BRAF"])
    assert fake.counts["lookup"] == 1


async def test_dropped_sequence_ids_are_asked_again(serve: Start) -> None:
    fake = await serve(drop_ids={BRAF_CANONICAL, "ENSP00000419060"})
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["BRAF"])
    assert [i.protein_id for i in gene.isoforms] == BRAF_CODING
    assert fake.counts["sequence"] == 2 and gene.missing_protein_ids == ()
    assert gene.status == "ok" and gene.canonical_protein_id == BRAF_CANONICAL


async def test_ids_dropped_for_good_are_recorded_not_lost(serve: Start) -> None:
    fake = await serve(drop_ids={"ENSP00000419060"}, drop_once=False)
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["BRAF"])
    assert len(gene.isoforms) == 4 and gene.missing_protein_ids == ("ENSP00000419060",)
    assert gene.isoforms[0].protein_id == BRAF_CANONICAL
    assert gene.status == "incomplete" and gene.canonical_protein_id == BRAF_CANONICAL
    assert not gene.canonical_missing


async def test_a_dropped_canonical_is_said_not_hidden(serve: Start) -> None:
    fake = await serve(drop_ids={BRAF_CANONICAL}, drop_once=False)
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["BRAF"])
    assert gene.status == "incomplete" and gene.canonical_missing
    assert gene.canonical is None and gene.isoforms[0].protein_id == BRAF_CODING[1]


async def test_a_coding_gene_with_every_sequence_dropped_is_not_no_protein(
        serve: Start) -> None:
    fake = await serve(drop_ids=set(BRAF_CODING), drop_once=False)
    async with client(fake) as c:
        (gene,) = await c.fetch_isoforms(["BRAF"])
    assert gene.status == "incomplete" and gene.isoforms == ()
    assert gene.missing_protein_ids == tuple(sorted(BRAF_CODING)) and gene.canonical_missing


async def test_low_remaining_budget_slows_down(serve: Start) -> None:
    # 15 requests left in a window that resets in 0.3 s: spread them, about 20 ms apart.
    fake = await serve(hourly_limit=15, reset_seconds=0.3)
    async with client(fake, lookup_chunk_size=5) as c:
        genes = await c.fetch_isoforms([f"GENE{i:04d}" for i in range(1, 11)])
        stats = c.stats
    assert stats["slowdowns"] == stats["requests"] and all(g.status == "ok" for g in genes)


async def test_unreachable_server_fails_fast(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with EnsemblClient(base_url=f"http://127.0.0.1:{port}") as c:
        with pytest.raises(EnsemblUnavailableError, match="cannot reach"):
            await c.fetch_isoforms(["BRAF"])
        stats = c.stats
    assert stats["requests"] == 1 and "retries" not in stats  # no retry, no backoff sleep


async def test_symbols_in_another_case_match_with_a_warning(
        serve: Start, caplog: pytest.LogCaptureFixture) -> None:
    fake = await serve()
    async with client(fake) as c:
        genes = await c.fetch_isoforms(["braf", "Gene0001", "GENE0002", "nope"])
    assert [g.status for g in genes] == ["ok", "ok", "ok", "not_found"]
    assert [g.query for g in genes][:2] == ["braf", "Gene0001"]  # the user's spelling
    assert genes[0].gene_id == "ENSG00000157764"
    assert "braf: matched Ensembl symbol BRAF only ignoring case" in caplog.text
    assert fake.counts["lookup"] == 2  # one retry request for the misses, not one each


async def test_release_is_asked_and_its_absence_is_not_an_error(serve: Start) -> None:
    fake = await serve(release=112)
    async with client(fake) as c:
        assert await c.release() == 112
    silent = await serve(release=None)
    async with client(silent) as c:
        assert await c.release() is None
