"""Read a worker's ``/metrics`` and ``/readyz`` into plain numbers (for ``streamer top``).

Three layers, each usable alone: :func:`parse_metrics` turns a Prometheus text exposition into a
:class:`WorkerScrape` (pure), :func:`histogram_quantile` and :func:`bucket_delta` do the
percentile arithmetic Prometheus does (pure), and :func:`scrape` fetches one worker over HTTP and
never raises: an unreachable worker comes back with ``ok=False`` and the reason.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

#: A cumulative histogram: ``(upper bound, observations <= bound)`` ascending, ending at ``+Inf``.
Buckets = tuple[tuple[float, float], ...]


@dataclass
class WorkerScrape:
    """What one scrape of one worker said. Counters are cumulative, as exported."""

    target: str
    """The metrics URL scraped."""
    at: float = 0.0
    """time.monotonic() of the scrape (for rates)."""
    ok: bool = False
    """False: /metrics could not be read or parsed; see :attr:`error`."""
    error: str = ""
    ready: bool | None = None
    """/readyz answered 200 (True) or 503 (False); None: no answer, fall back to streamer_ready."""
    worker: str = ""
    model: str = ""
    version: str = ""
    running: float = 0.0
    waiting: dict[str, float] = field(default_factory=dict)
    generation_tokens: float = 0.0
    requests: dict[tuple[str, str], float] = field(default_factory=dict)
    """(priority, outcome) -> count."""
    ttft: dict[str, Buckets] = field(default_factory=dict)
    """priority -> cumulative TTFT buckets."""
    kv_usage: float | None = None
    ready_gauge: float | None = None
    stage_busy: dict[str, float] = field(default_factory=dict)
    """stage -> busy seconds."""
    output_records: dict[str, float] = field(default_factory=dict)
    """kind (tokens, events, dlq) -> messages produced."""
    output_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def is_ready(self) -> bool:
        if self.ready is not None:
            return self.ready
        return bool(self.ready_gauge)


def parse_metrics(text: str, target: str = "", at: float = 0.0) -> WorkerScrape:
    """Parse a worker's exposition into a :class:`WorkerScrape` (``ok=True``).

    Unknown series are ignored, so the view keeps working against newer or older workers.
    Raises ValueError (from the parser) on text that is not a Prometheus exposition.
    """
    s = WorkerScrape(target=target, at=at, ok=True)
    raw_buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "streamer_num_requests_running":
                s.running = value
            elif name == "streamer_num_requests_waiting":
                s.waiting[labels.get("priority", "")] = value
            elif name == "streamer_generation_tokens_total":
                s.generation_tokens = value
            elif name == "streamer_requests_total":
                key = (labels.get("priority", ""), labels.get("outcome", ""))
                s.requests[key] = s.requests.get(key, 0.0) + value
            elif name == "streamer_time_to_first_token_seconds_bucket":
                raw_buckets.setdefault(labels.get("priority", ""), []).append(
                    (float(labels["le"]), value))
            elif name == "streamer_kv_cache_usage_ratio":
                s.kv_usage = value
            elif name == "streamer_ready":
                s.ready_gauge = value
            elif name == "streamer_stage_busy_seconds_total":
                s.stage_busy[labels.get("stage", "")] = value
            elif name == "streamer_output_records_total":
                s.output_records[labels.get("kind", "")] = value
            elif name == "streamer_output_bytes_total":
                s.output_bytes[labels.get("kind", "")] = value
            elif name == "streamer_info":
                s.worker = labels.get("worker", "")
                s.model = labels.get("model", "")
                s.version = labels.get("version", "")
    s.ttft = {lane: tuple(sorted(b)) for lane, b in raw_buckets.items()}
    return s


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly inside a bucket.

    Same rules as PromQL's ``histogram_quantile``: None without observations; a quantile that
    falls in the ``+Inf`` bucket is reported as the largest finite bound; the first bucket's
    lower bound is 0.
    """
    if not buckets or not 0 <= q <= 1:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower if lower > 0 else None
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def bucket_delta(previous: Buckets | None, current: Buckets) -> Buckets:
    """Observations between two scrapes of one histogram.

    A counter that went down means the worker restarted: then the current values are the delta
    (what PromQL's ``increase`` assumes too). Bounds that differ between the scrapes do too.
    """
    if not previous or [b for b, _ in previous] != [b for b, _ in current]:
        return current
    if any(c < p for (_, p), (_, c) in zip(previous, current, strict=True)):
        return current
    return tuple((b, c - p) for (b, p), (_, c) in zip(previous, current, strict=True))


def sum_buckets(histograms: Iterable[Buckets]) -> Buckets:
    """Add histograms with the same bounds (several workers, or several lanes)."""
    total: dict[float, float] = {}
    for buckets in histograms:
        for bound, count in buckets:
            total[bound] = total.get(bound, 0.0) + count
    return tuple(sorted(total.items()))


def counter_delta(previous: float | None, current: float) -> float:
    """Increase of a counter between two scrapes; a decrease means a restart (delta = current)."""
    if previous is None or current < previous:
        return current
    return current - previous


# ---------------------------------------------------------------------------------- fetching


def metrics_url(target: str) -> str:
    """Normalise ``host:port``, ``http://host:port`` or a full URL to the /metrics URL."""
    if "://" not in target:
        target = "http://" + target
    parts = urlsplit(target)
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def readyz_url(metrics: str) -> str:
    parts = urlsplit(metrics_url(metrics))
    return urlunsplit((parts.scheme, parts.netloc, "/readyz", "", ""))


# No proxies: a worker on 127.0.0.1 must not be fetched through $http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:  # 503 from /readyz is an answer, not a failure
        return int(exc.code), exc.read()


async def scrape(target: str, http_timeout_s: float = 2.0) -> WorkerScrape:
    """Fetch and parse one worker's /metrics and /readyz; never raises."""
    url = metrics_url(target)
    at = time.monotonic()
    metrics_call = asyncio.to_thread(_get, url, http_timeout_s)
    ready_call = asyncio.to_thread(_get, readyz_url(url), http_timeout_s)
    metrics_result, ready_result = await asyncio.gather(metrics_call, ready_call,
                                                        return_exceptions=True)
    if isinstance(metrics_result, BaseException):
        return WorkerScrape(target=url, at=at, error=_describe(metrics_result))
    status, body = metrics_result
    if status != 200:
        return WorkerScrape(target=url, at=at, error=f"HTTP {status}")
    try:
        result = parse_metrics(body.decode("utf-8", errors="replace"), url, at)
    except Exception as exc:  # not an exposition: show it, do not crash the view
        return WorkerScrape(target=url, at=at, error=f"unparsable metrics: {_describe(exc)}")
    if not isinstance(ready_result, BaseException):
        result.ready = ready_result[0] == 200
    return result


async def scrape_all(targets: Sequence[str], http_timeout_s: float = 2.0) -> list[WorkerScrape]:
    """Scrape every target concurrently, in the order given."""
    return list(await asyncio.gather(*(scrape(t, http_timeout_s) for t in targets)))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        reason = exc.reason
        return reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def previous_by_target(scrapes: Iterable[WorkerScrape]) -> Mapping[str, WorkerScrape]:
    """The successful scrapes keyed by target: the baseline for the next round's rates."""
    return {s.target: s for s in scrapes if s.ok}
