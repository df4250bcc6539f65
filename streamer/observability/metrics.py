"""Every Prometheus metric a worker exports, defined once.

Each :class:`WorkerMetrics` owns its own :class:`~prometheus_client.CollectorRegistry` rather than
the process-global one, so a test (or a process hosting several workers) can build as many as it
likes without "duplicated timeseries" errors, and so ``/metrics`` shows exactly this worker.

Names follow vLLM's where one exists (``time_to_first_token_seconds``, ``num_requests_running``,
``kv_cache_usage``...) so existing dashboards and habits carry over. Dashboards and alerts under
``deploy/`` refer to these names; ``tests/test_deploy_files.py`` checks every reference against
:data:`EXPORTED_METRIC_NAMES`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

import streamer

log = logging.getLogger(__name__)

#: The priority lanes, in order of precedence. Label values are pre-created for each so that
#: rate() and histogram_quantile() see a zero series instead of no series before the first request.
PRIORITIES: Final[tuple[str, ...]] = ("urgent", "high", "normal", "low")

#: Request outcomes: the five terminal events of the protocol, plus ``dlq`` for records that never
#: became a request (undecodable, bad id, duplicate id) and were copied to the dead-letter topic.
OUTCOMES: Final[tuple[str, ...]] = (
    "completed", "failed", "rejected", "cancelled", "expired", "dlq",
)  # fmt: skip

#: Label values of ``streamer_output_records`` / ``streamer_output_bytes``.
OUTPUT_KINDS = ("tokens", "events", "dlq")
#: Result-cache levels, the label values of ``streamer_cache_*``.
CACHE_LEVELS: Final[tuple[str, ...]] = ("l1", "l2", "l3")
#: States of a KV-cache block, the label values of ``streamer_kv_cache_blocks``; the three series
#: sum to the cache's capacity. ``cached`` blocks are free but still hold a prefix a new request can
#: reuse (eviction takes them last, oldest first); ``empty`` ones hold nothing worth keeping.
KV_BLOCK_STATES: Final[tuple[str, ...]] = ("used", "cached", "empty")

#: Latency buckets, 5 ms .. 120 s. Dense below 1 s where interactive SLOs live; sparse above,
#: where only "how bad" matters. TTFT, e2e and queue time are all measured from the producer's
#: Kafka timestamp, so they can legitimately reach minutes when the lanes are backed up.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
)  # fmt: skip

#: Per-output-token latency is one decode step: milliseconds on a GPU, up to ~1 s for a big model
#: on a CPU. Finer at the bottom than LATENCY_BUCKETS; nothing past 10 s is a useful distinction.
TPOT_BUCKETS: Final[tuple[float, ...]] = (
    0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: Sequences per engine step, 1 .. 512 (roughly log-spaced; batch sizes cluster at powers of two).
BATCH_SIZE_BUCKETS: Final[tuple[float, ...]] = (
    1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
)  # fmt: skip


class WorkerMetrics:
    """All metrics of one worker, on a registry of its own.

    Attributes are the prometheus-client metric objects; callers use them directly
    (``m.requests.labels(priority="high", outcome="completed").inc()``). Counter attributes are
    declared without the ``_total`` suffix, which prometheus-client appends on export, so the
    exported names are exactly the documented ones.

    Labelled metrics whose label values are known in advance (priority, outcome, block state) are
    pre-created at zero. ``consumer_lag`` (topic, partition) and the device gauges are created on
    first use; the worker should ``remove()`` a partition's lag series when the partition is
    revoked, so a rebalance does not leave a stale value behind on the old owner.
    """

    def __init__(
        self,
        *,
        model: str = "",
        worker: str = "",
        version: str = streamer.__version__,
        process_metrics: bool = True,
    ) -> None:
        """Create the registry and every metric on it.

        Args:
            model: model path or id, for ``streamer_info``.
            worker: worker identity (e.g. consumer client id or hostname), for ``streamer_info``.
            version: streamer version, for ``streamer_info``.
            process_metrics: register prometheus-client's ProcessCollector (``process_*``:
                resident memory, CPU seconds, fds). It reads /proc, so it exports nothing on
                platforms without one; turning it off only matters for tests that want a
                fully deterministic exposition.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self._process_metrics = process_metrics
        self._model_pid: int | None = None
        r = self.registry

        # --- latency histograms (per priority lane) ---------------------------------------
        self.time_to_first_token = Histogram(
            "streamer_time_to_first_token_seconds",
            "Time from the request record's Kafka timestamp to its first generated token.",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "streamer_time_per_output_token_seconds",
            "Time between consecutive output tokens of one request (decode step latency).",
            ["priority"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "streamer_e2e_request_latency_seconds",
            "Time from the request record's Kafka timestamp to its terminal event.",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_queue_time = Histogram(
            "streamer_request_queue_time_seconds",
            "Time from the request record's Kafka timestamp until the scheduler first runs it.",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "streamer_batch_size",
            "Sequences in one engine step (prefill chunks plus decodes).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )

        # --- counters ----------------------------------------------------------------------
        self.requests = Counter(
            "streamer_requests",
            "Requests finished, by priority lane and outcome (first terminal event, or dlq).",
            ["priority", "outcome"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "streamer_generation_tokens",
            "Output tokens generated (published to the tokens topic).",
            registry=r,
        )
        self.output_records = Counter(
            "streamer_output_records",
            "Messages produced, by kind (tokens, events, dlq): the broker's cost is per record, "
            "so records / generated tokens is the Kafka cost of a token.",
            ["kind"],
            registry=r,
        )
        self.output_bytes = Counter(
            "streamer_output_bytes",
            "Bytes produced (value, key and headers), by kind (tokens, events, dlq).",
            ["kind"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "streamer_prompt_tokens",
            "Prompt tokens prefilled.",
            registry=r,
        )
        self.num_preemptions = Counter(
            "streamer_num_preemptions",
            "Running sequences preempted to make room for higher-priority work.",
            registry=r,
        )
        self.resumed_attempts = Counter(
            "streamer_resumed_attempts",
            "Attempts that continued an earlier attempt's progress instead of starting over.",
            registry=r,
        )
        self.resumed_tokens = Counter(
            "streamer_resumed_tokens",
            "Completion tokens those attempts did not have to generate again (tokens).",
            registry=r,
        )
        self.progress_records = Counter(
            "streamer_progress_records",
            "Progress records written (acknowledged tokens of in-flight attempts).",
            registry=r,
        )
        self.errors = Counter(
            "streamer_errors",
            "Errors by kind (e.g. decode, produce, commit, engine, device_stats).",
            ["kind"],
            registry=r,
        )
        # Prefix cache, in tokens, with vLLM's semantics (vllm:prefix_cache_queries / _hits): a
        # request's prompt tokens are queried once, when it is first admitted, and the hits are the
        # leading tokens found in cached blocks. Re-admissions after preemption count apart.
        self.prefix_cache_queries = Counter(
            "streamer_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache, once per admitted request (tokens).",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "streamer_prefix_cache_hits",
            "Of the queried prompt tokens, those served from cached KV blocks: prefill skipped "
            "them (tokens; whole blocks only).",
            registry=r,
        )
        self.prefix_cache_preempted_queries = Counter(
            "streamer_prefix_cache_preempted_queries",
            "Tokens (prompt and output so far) looked up when a preempted sequence is resumed; "
            "not part of the hit ratio (tokens).",
            registry=r,
        )
        self.prefix_cache_preempted_hits = Counter(
            "streamer_prefix_cache_preempted_hits",
            "Of the tokens looked up on resume, those still cached; queried minus hits is what "
            "preemption made the engine recompute (tokens).",
            registry=r,
        )
        # Result cache (docs/cache.md), per level: l1 memory, l2 Redis, l3 disk. A lookup goes
        # down the levels until one hits, so every level a lookup reaches counts a hit or a miss.
        self.cache_hits = Counter(
            "streamer_cache_hits",
            "Result-cache lookups answered by this level (the request skipped the engine).",
            ["level"],
            registry=r,
        )
        self.cache_misses = Counter(
            "streamer_cache_misses",
            "Result-cache lookups this level could not answer (including failed calls).",
            ["level"],
            registry=r,
        )
        self.cache_errors = Counter(
            "streamer_cache_errors",
            "Failed result-cache calls (e.g. Redis down or slower than its timeout), by level; "
            "each is a miss, never a failed request.",
            ["level"],
            registry=r,
        )
        self.cache_l1_bytes = Gauge(
            "streamer_cache_l1_bytes",
            "Bytes of entries held by the in-process result cache (L1).",
            registry=r,
        )
        self.stage_busy_seconds = Counter(
            "streamer_stage_busy_seconds",
            "Seconds each pipeline stage spent computing; rate() of it is the stage's busy "
            "fraction, and unequal rates show an unbalanced layer split.",
            ["stage"],
            registry=r,
        )

        # --- gauges ------------------------------------------------------------------------
        self.num_requests_running = Gauge(
            "streamer_num_requests_running",
            "Sequences currently admitted to the engine (running or preempted-and-resumable).",
            registry=r,
        )
        self.num_requests_waiting = Gauge(
            "streamer_num_requests_waiting",
            "Requests consumed and waiting for admission, per priority lane.",
            ["priority"],
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "streamer_kv_cache_usage_ratio",
            "Fraction of the KV-cache blocks held by sequences (0..1); free blocks that still "
            "hold a cached prefix count as free.",
            registry=r,
        )
        self.kv_cache_blocks = Gauge(
            "streamer_kv_cache_blocks",
            "KV-cache blocks by state: used (held by a sequence), cached (free, holding a "
            "reusable prefix; evicted last), empty (free). The states sum to the capacity.",
            ["state"],
            registry=r,
        )
        self.prefix_cache_hit_ratio = Gauge(
            "streamer_prefix_cache_hit_ratio",
            "prefix_cache_hits / prefix_cache_queries over this worker's lifetime (0..1; 0 while "
            "nothing has been queried). For a window or a fleet, divide rate()s of the counters.",
            registry=r,
        )
        self.chunk_window = Gauge(
            "streamer_chunk_window_seconds",
            "The current wait between one request's token chunks: --chunk-ms, stretched under "
            "load to streams / --chunk-records-per-s.",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "streamer_consumer_lag",
            "Records between this worker's committed offset and the partition's end, per "
            "assigned partition (in-flight requests count until they finish).",
            ["topic", "partition"],
            registry=r,
        )
        self.ready = Gauge(
            "streamer_ready",
            "1 when the worker is ready to serve (model loaded, consumer assigned), else 0.",
            registry=r,
        )
        self.device_memory_used = Gauge(
            "streamer_device_memory_used_bytes",
            "Accelerator memory in use (whole device, all processes), per device.",
            ["device"],
            registry=r,
        )
        self.device_memory_total = Gauge(
            "streamer_device_memory_total_bytes",
            "Accelerator memory capacity, per device.",
            ["device"],
            registry=r,
        )
        self.device_utilization = Gauge(
            "streamer_device_utilization_ratio",
            "Accelerator compute utilisation over the driver's last sample period (0..1).",
            ["device"],
            registry=r,
        )
        # A gauge fixed at 1 rather than prometheus-client's Info: Info would name the family
        # "streamer" and export "streamer_info"; a gauge keeps family and series name identical.
        self.info = Gauge(
            "streamer_info",
            "Constant 1; labels carry the streamer version, the model and the worker identity.",
            ["version", "model", "worker"],
            registry=r,
        )
        if process_metrics:
            # Standard process_* names (process_resident_memory_bytes, process_cpu_seconds_total)
            # so generic node/process dashboards work unchanged.
            ProcessCollector(registry=r)

        for priority in PRIORITIES:
            for hist in (
                self.time_to_first_token,
                self.time_per_output_token,
                self.e2e_request_latency,
                self.request_queue_time,
            ):
                hist.labels(priority=priority)
            self.num_requests_waiting.labels(priority=priority).set(0)
            for outcome in OUTCOMES:
                self.requests.labels(priority=priority, outcome=outcome)
        for state in KV_BLOCK_STATES:
            self.kv_cache_blocks.labels(state=state).set(0)
        for level in CACHE_LEVELS:
            for counter in (self.cache_hits, self.cache_misses, self.cache_errors):
                counter.labels(level=level)
        for kind in OUTPUT_KINDS:
            self.output_records.labels(kind=kind)
            self.output_bytes.labels(kind=kind)
        self.ready.set(0)
        self.set_info(version=version, model=model, worker=worker)

    def set_info(self, *, version: str, model: str, worker: str) -> None:
        """Replace the single ``streamer_info`` series (e.g. once the model id is resolved)."""
        self.info.clear()
        self.info.labels(version=version, model=model, worker=worker).set(1)

    def watch_model_process(self, pid: int | None) -> None:
        """Export the model process's own ``streamer_model_process_*`` (resident memory, CPU):
        its weights and KV cache are not in this process's ``process_*``. None: no such
        process (the model runs on this process's threads)."""
        first = self._model_pid is None
        self._model_pid = pid
        if first and pid is not None and self._process_metrics:
            # A pid that no longer exists reads as no samples (ProcessCollector skips it).
            ProcessCollector(namespace="streamer_model", registry=self.registry,
                             pid=lambda: self._model_pid if self._model_pid is not None else -1)

    def set_ready(self, ready: bool) -> None:
        """Set ``streamer_ready`` to 1 or 0."""
        self.ready.set(1 if ready else 0)

    def refresh_device_stats(self, devices: Sequence[str] | None = None) -> None:
        """Fill the ``streamer_device_*`` gauges from torch.cuda; never raises.

        Args:
            devices: device names the worker uses (``["cuda:0", "cpu"]``); CPU entries are
                ignored. ``None`` means every visible CUDA device.

        On a machine without torch or without CUDA this does nothing, so the device series
        simply do not exist and GPU-only alerts stay silent there. Utilisation needs NVML
        (``pynvml``); without it that one gauge is left unset.
        """
        try:
            import torch  # local: keeps importing this module cheap for tests and tools

            if not torch.cuda.is_available():
                return
            if devices is None:
                indices: Iterable[int] = range(torch.cuda.device_count())
            else:
                indices = sorted(
                    {torch.device(d).index or 0 for d in devices if d.startswith("cuda")}
                )
            for index in indices:
                label = f"cuda:{index}"
                # mem_get_info asks the driver, so it counts every process on the device, which
                # is what matters for "will the next allocation fit".
                free, total = torch.cuda.mem_get_info(index)
                self.device_memory_used.labels(device=label).set(total - free)
                self.device_memory_total.labels(device=label).set(total)
                try:
                    percent = torch.cuda.utilization(index)
                except Exception:  # no NVML (pynvml) or the driver refuses: skip just this one
                    continue
                self.device_utilization.labels(device=label).set(percent / 100.0)
        except ImportError:
            return
        except Exception:
            # Metrics must never take the worker down; count it so the failure is visible.
            self.errors.labels(kind="device_stats").inc()
            log.debug("device stats refresh failed", exc_info=True)


def render(metrics: WorkerMetrics) -> bytes:
    """Return the Prometheus text exposition of ``metrics``' registry."""
    return generate_latest(metrics.registry)


def exported_metric_names(registry: CollectorRegistry) -> frozenset[str]:
    """Every series name ``registry`` can export, including families that have no samples yet.

    Derived from the family types, the way Prometheus will see them: counters as ``_total`` and
    ``_created``, histograms as ``_bucket``/``_sum``/``_count``/``_created``, gauges by their own
    name. A counter's or histogram's bare family name (``streamer_requests``) is *not* included:
    no series has that name, so a query using it would silently return nothing.
    """
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "enum": ("",),
    }
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


def _exported() -> frozenset[str]:
    """From a throwaway instance that watches a model process (this one, standing in), so it
    can never drift from the code and includes the model process's series."""
    metrics = WorkerMetrics()
    metrics.watch_model_process(os.getpid())
    return exported_metric_names(metrics.registry)


#: Series names a worker exports (see :func:`exported_metric_names`), for checking references in
#: dashboards and alert rules.
EXPORTED_METRIC_NAMES: Final[frozenset[str]] = _exported()
