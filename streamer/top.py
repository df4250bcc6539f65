"""`streamer top` (placeholder until the live view lands)."""

from __future__ import annotations

from typing import Any


def add_top_parser(sub: Any) -> None:
    p = sub.add_parser("top", help="live terminal view of the fleet")
    p.set_defaults(func=lambda args: 2)
