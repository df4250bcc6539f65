"""structlog set-up: JSON lines outside a terminal, readable lines in one."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import structlog


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    json = not sys.stderr.isatty() if json is None else json
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    # aiokafka logs every reconnect attempt during an outage; keep only its warnings and worse.
    aiokafka = logging.getLogger("aiokafka")
    aiokafka.setLevel(max(numeric, logging.WARNING))
    # During an outage it logs an error per reconnect attempt: one line per kind, then a count.
    if not any(isinstance(f, RepeatSummary) for f in aiokafka.filters):
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, RepeatSummary) for f in handler.filters):
                handler.addFilter(RepeatSummary("aiokafka"))
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


class RepeatSummary(logging.Filter):
    """Lets the first record of each message template through, then one summary per window.

    Applies to loggers under `prefix` only. Keyed by the unformatted message (`record.msg`), so
    "Unable connect to node with id 1" and "... id 2" are one kind of line."""

    def __init__(
        self, prefix: str, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # template -> (window start, suppressed)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        template, now = str(record.msg), self.clock()
        started, suppressed = self._seen.get(template, (None, 0))
        if started is None or now - started >= self.window_s:
            self._seen[template] = (now, 0)
            if suppressed:
                record.msg = f"{record.msg} [and {suppressed} similar lines in the last window]"
            return True
        self._seen[template] = (started, suppressed + 1)
        return False


class _Stderr:
    """Whatever `sys.stderr` is at the time of writing: a logger configured once must not keep a
    stream that was replaced since (test capture, daemonisation)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
