"""The test gate (STREAMER_TEST_GATE): a file that tells the engine when it may start a step.

Test-only; production never sets it, and then the engine never looks at the file system. Tests use
it to hold a worker at a point they choose ("mid-generation", "nothing started yet") instead of
racing it with sleeps. docs/testing.md describes it for test authors.

While the file is absent the engine runs freely. While it exists its content is a rule:

- empty: hold. No new step starts; steps already in flight finish.
- `tokens=N` (N >= 1): a step starts only while every request in the engine has fewer than N output
  tokens. Generation runs until some request has exactly N tokens, then holds. A request that
  finishes before N (EOS, max_tokens) leaves the engine and no longer counts.

Removing the file, or rewriting it with another rule, takes effect at the next step. Anything
else in the file is an error that stops the engine (loudly: every request fails).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

POLL_S = 0.005
"""How often a held engine reads the gate file again."""


@dataclass(frozen=True)
class GateRule:
    tokens: int | None = None
    """None: hold now. N: hold once some request has N output tokens."""

    def holds(self, max_output_tokens: int) -> bool:
        return self.tokens is None or max_output_tokens >= self.tokens

    def __str__(self) -> str:
        return "hold" if self.tokens is None else f"tokens={self.tokens}"


def parse_rule(text: str) -> GateRule:
    text = text.strip()
    if not text:
        return GateRule()
    name, _, value = text.partition("=")
    if name.strip() == "tokens" and value.strip().isdigit() and int(value) >= 1:
        return GateRule(tokens=int(value))
    raise ValueError(
        f"test gate: cannot read {text!r}; expected an empty file or tokens=N (N >= 1)"
    )


def read_rule(path: str | Path) -> GateRule | None:
    """The gate's rule, or None when the file is absent (the engine runs freely)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return parse_rule(text)


class Gate:
    """The engine's view of the gate file: read before each step, and whether it holds now."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = path
        self.rule: GateRule | None = None
        self.held = False
        """The gate holds the engine and no step is in flight."""

    def holds(self, max_output_tokens: Callable[[], int]) -> bool:
        """Whether the gate holds the next step; False at once when no gate is configured (so
        production never reads the file nor counts tokens)."""
        if self.path is None:
            return False
        self.rule = read_rule(self.path)
        held = self.rule is not None and self.rule.holds(max_output_tokens())
        if not held and self.held:
            self.held = False
            log.info("test_gate_released", rule=str(self.rule or "absent"))
        return held

    def report_held(self, requests: int, max_output_tokens: Callable[[], int]) -> None:
        """Held with nothing in flight: until the gate opens, no request changes."""
        if self.held:
            return
        self.held = True
        log.info(
            "test_gate_held",
            rule=str(self.rule),
            requests=requests,
            max_output_tokens=max_output_tokens(),
        )
