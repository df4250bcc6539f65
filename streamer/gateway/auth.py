"""Optional API keys, checked as `Authorization: Bearer <key>` on every /v1 route.

Keys come from --api-key / STREAMER_GATEWAY_API_KEYS and --api-key-file; none at all disables
the check. Keys are compared in constant time and never logged or echoed back.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from streamer.gateway.openai_format import ApiError


def load_keys(keys: Iterable[str], key_file: str | None) -> tuple[str, ...]:
    found = [k.strip() for k in keys if k.strip()]
    if key_file:
        for line in Path(key_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return tuple(dict.fromkeys(found))


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """ApiError(401) unless the header carries an accepted key (or no key is configured)."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode()
        # Compare with every key, so the time taken does not tell which one nearly matched.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "Incorrect API key provided: send `Authorization: Bearer "
                           "<key>` with a key this gateway accepts", code="invalid_api_key")

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"
