"""What makes two requests the same: the cache key, and which requests may have one (pure).

A key names everything that can change a request's output: the model (its files, the dtype and
the kind of device it runs on), the rendered prompt's token ids, every sampling parameter, and the
protocol and cache-format versions. Parameters that cannot change the output are normalised away,
so they do not split one result into several entries: greedy decoding ignores seed, top_p and
top_k (DECISIONS rule 8). Metadata and deadlines are not part of the output and not in the key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec

import streamer
from streamer.engine.sequence import SamplingParams
from streamer.protocol import PROTOCOL_VERSION

CACHE_FORMAT = 1
"""Bumped whenever what an entry holds, or how the engine turns tokens into text, changes."""

_READ_BYTES = 1 << 20


def cacheable(params: SamplingParams) -> bool:
    """Only a deterministic request: greedy, or sampled with its own seed. An unseeded sampled
    request draws a random seed, so its output is not a function of the request."""
    return params.greedy or params.seed is not None


def cache_key(identity: str, prompt_ids: list[int], params: SamplingParams) -> str:
    """Hex digest naming the output of `prompt_ids` under `params` on model `identity`."""
    if not cacheable(params):
        raise ValueError("an unseeded sampled request has no cache key")
    greedy = params.greedy
    parts = (
        "streamer-result", PROTOCOL_VERSION, CACHE_FORMAT, streamer.__version__, identity,
        prompt_ids, params.max_tokens, params.temperature,
        1.0 if greedy else params.top_p, 0 if greedy else params.top_k,
        None if greedy else params.seed, list(params.stop), params.ignore_eos,
    )
    return hashlib.sha256(msgspec.msgpack.encode(parts)).hexdigest()


def model_identity(model: str, dtype: str, devices: tuple[str, ...]) -> str:
    """The model's identity: a hash of its files' bytes (a folder, a .gguf file, or the cached
    snapshot of a hub id), with the dtype and the device kinds its numbers come from.

    Hashing reads every byte once (a few hundred MB take about a second); it runs off the event
    loop when the cache starts. Raises FileNotFoundError when the files cannot be found."""
    path = Path(model)
    if not path.exists():
        path = _hub_snapshot(model)
    digest = hashlib.blake2b(digest_size=20)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # .git, .cache, editor files: not the model
        digest.update(rel.encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(_READ_BYTES):
                digest.update(block)
    kinds = ",".join(d.split(":")[0] for d in devices)
    return f"{digest.hexdigest()}/{dtype}/{kinds}"


def _hub_snapshot(model: str) -> Path:
    """The local snapshot folder of a hub id (its name is the revision), as transformers uses."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a hub id either (HFValidationError)
        found = None
    if not isinstance(found, str) or not os.path.exists(found):
        raise FileNotFoundError(f"no local files for model {model!r}")
    return Path(found).parent
