"""JSON POST to Ensembl REST with a rate limiter, a shared pause, and bounded retries.

Why a layer of its own: the client's job is genes and isoforms; this module's job is to
be a good citizen of a shared public server (Ensembl bans IPs that ignore 429s) while
surviving its real failure modes:

- a client-side rate limit (aiolimiter, spaced requests rather than bursts) and at most
  `parallel_workers` requests in flight;
- HTTP 429: every request of the client waits Retry-After (fractional seconds), not only
  the one that got it; X-RateLimit-Remaining running low spreads what is left of the
  window over the time until X-RateLimit-Reset;
- 5xx, timeouts, connection resets and non-JSON bodies: exponential backoff with full
  jitter, a bounded number of attempts, then EnsemblUnavailableError naming the genes;
- HTTP 400 (and other 4xx): never retried; the server's {"error": ...} text is raised;
- the server cannot be reached at all on the first contact: fail at once, since retrying
  an offline machine for minutes helps nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter

from esm2_batch.errors import EnsemblRequestError, EnsemblUnavailableError

log = logging.getLogger("esm2_batch.sources.ensembl_rest")

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try: attempts per request for failures, and a separate 429 budget.

    429s have their own, larger budget because waiting them out is the correct reaction
    to a busy server, not a sign that it is down.
    """

    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_rate_limited: int = 50
    default_retry_after: float = 1.0
    low_remaining: int = 20

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff (AWS architecture blog): spread the herd."""
        return rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))


class PauseGate:
    """A pause every request honours before it is sent (set by 429s and low budgets)."""

    def __init__(self, *, clock: Clock, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._until = 0.0

    def pause_for(self, seconds: float) -> None:
        """Hold every request until `seconds` from now (an earlier end never shortens)."""
        self._until = max(self._until, self._clock() + max(0.0, seconds))

    async def wait(self) -> None:
        while (remaining := self._until - self._clock()) > 0:
            await self._sleep(remaining)


@dataclass(slots=True)
class _Outcome:
    """One attempt's result: data on success, else why it failed and if it may retry."""

    data: Any = None
    ok: bool = False
    status: int | None = None
    reason: str = ""
    retry_after: float | None = None


class JsonTransport:
    """POST JSON bodies to one base URL, politely and persistently."""

    def __init__(
        self,
        base_url: str,
        *,
        rate_limit: float = 10.0,
        parallel_workers: int = 10,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if rate_limit <= 0 or parallel_workers < 1:
            raise ValueError("rate_limit must be > 0 and parallel_workers >= 1")
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.stats: Counter[str] = Counter()
        self._limiter = AsyncLimiter(1, 1.0 / rate_limit)  # spaced, no initial burst
        self._slots = asyncio.Semaphore(parallel_workers)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._owns_session = session is None
        self._sleep, self._clock = sleep, clock
        self._gate = PauseGate(clock=clock, sleep=sleep)
        self._rng = rng or random.Random()
        self._reached = False

    async def __aenter__(self) -> JsonTransport:
        if self._session is None:
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            self._session = aiohttp.ClientSession(headers=headers)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, path: str, body: dict[str, Any] | None, *,
                   queries: Sequence[str]) -> Any:
        """POST `body` (GET when None) to `path` and return the decoded JSON, retrying
        what is transient."""
        failures = limited = 0
        while True:
            outcome = await self._attempt(path, body)
            if outcome.ok:
                return outcome.data
            if outcome.status == 429:
                limited += 1
                self._on_rate_limited(outcome, limited, path, queries)
                continue
            failures += 1
            self._raise_if_final(outcome, failures, path, queries)
            delay = self.retry.backoff(failures, self._rng)
            log.info("%s: %s; retry %d in %.2fs", path, outcome.reason, failures, delay)
            self.stats["retries"] += 1
            await self._sleep(delay)

    async def get(self, path: str) -> Any:
        """GET `path` (small informational endpoints), with the same politeness."""
        return await self.post(path, None, queries=())

    async def _attempt(self, path: str, body: dict[str, Any] | None) -> _Outcome:
        async with self._slots:
            await self._gate.wait()
            async with self._limiter:
                await self._gate.wait()  # a 429 may have arrived while we queued
                self.stats["requests"] += 1
                self.stats[f"requests {path.split('/')[1]}"] += 1
                return await self._send(path, body)

    async def _send(self, path: str, body: dict[str, Any] | None) -> _Outcome:
        assert self._session is not None, "use JsonTransport as 'async with'"
        method = "GET" if body is None else "POST"
        try:
            async with self._session.request(method, self.base_url + path, json=body,
                                             timeout=self._timeout) as resp:
                # Pause on the status line, before awaiting the body: any await between
                # reading a 429 and pausing lets a queued request through the pause.
                wait = self._pause_if_limited(resp.status, resp.headers)
                self._note_budget(resp.headers)
                self._reached = True
                text = await resp.text(errors="replace")
                outcome = _decode(resp.status, text)
                outcome.retry_after = wait
                return outcome
        except aiohttp.ClientConnectorError as exc:
            if not self._reached:
                raise EnsemblUnavailableError(f"cannot reach {self.base_url} ({exc})") from exc
            return _Outcome(reason=f"connection failed ({exc})")
        except (TimeoutError, aiohttp.ClientError) as exc:
            return _Outcome(reason=f"{type(exc).__name__} {exc}".strip())

    def _on_rate_limited(self, outcome: _Outcome, count: int, path: str,
                         queries: Sequence[str]) -> None:
        self.stats["n429"] += 1
        if count > self.retry.max_rate_limited:
            raise EnsemblUnavailableError(
                f"{path}: still rate limited (HTTP 429) after {count} waits; lower "
                "--rate_limit or --parallel_workers", queries=queries)
        log.warning("%s: HTTP 429, all requests paused for %.2fs", path,
                    outcome.retry_after or 0.0)

    def _pause_if_limited(self, status: int, headers: Any) -> float | None:
        """On a 429, pause every request for its Retry-After (fractional seconds, else
        the policy's default) and return that wait; None for any other status."""
        if status != 429:
            return None
        wait = _number(headers.get("Retry-After"))
        wait = self.retry.default_retry_after if wait is None else wait
        self._gate.pause_for(wait)
        return wait

    def _raise_if_final(self, outcome: _Outcome, failures: int, path: str,
                        queries: Sequence[str]) -> None:
        status = outcome.status
        if status is not None and 400 <= status < 500:
            raise EnsemblRequestError(f"{path}: HTTP {status}: {outcome.reason}",
                                      queries=queries)
        if failures >= self.retry.max_attempts:
            raise EnsemblUnavailableError(
                f"{path}: gave up after {failures} attempts, last: {outcome.reason}",
                queries=queries)

    def _note_budget(self, headers: Any) -> None:
        """Spread the rest of the window's budget when X-RateLimit-Remaining runs low."""
        remaining = _number(headers.get("X-RateLimit-Remaining"))
        reset = _number(headers.get("X-RateLimit-Reset"))
        if remaining is None or reset is None or remaining >= self.retry.low_remaining:
            return
        self.stats["slowdowns"] += 1
        self._gate.pause_for(reset / max(remaining, 1.0))


def _decode(status: int, text: str) -> _Outcome:
    """Turn a raw HTTP reply into an outcome; JSON that fails to parse is transient."""
    if status == 429:
        return _Outcome(status=429, reason="HTTP 429")
    try:
        data = json.loads(text)
    except ValueError:
        snippet = " ".join(text.split())[:80]
        return _Outcome(status=status if status >= 400 else None,
                        reason=f"HTTP {status} with a non-JSON body: {snippet!r}")
    if status == 200:
        return _Outcome(data=data, ok=True, status=200)
    message = data.get("error", text[:200]) if isinstance(data, dict) else text[:200]
    retryable = status >= 500  # outages (500/502/503/504) pass; a 4xx never will
    return _Outcome(status=None if retryable else status, reason=f"HTTP {status}: {message}")


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
