"""Turn logits into tokens with each request's own parameters.

Greedy rows share one argmax. A sampled row draws from a generator seeded by (the request's seed,
the token's index): the token at index i depends on the request and i alone, never on its
batch-mates nor on how many draws came before, so an attempt that resumes at index i on another
worker draws exactly what the interrupted one would have (docs/protocol.md, "Resumed attempts").
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from streamer.engine.sequence import SamplingParams

_MASK64 = (1 << 64) - 1


def base_seed(params: SamplingParams) -> int | None:
    """The seed a request's draws derive from: its own, a random one when it has none, None when
    greedy (greedy ignores seed)."""
    if params.greedy:
        return None
    return params.seed if params.seed is not None else secrets.randbits(63)


def token_seed(seed: int, index: int) -> int:
    """The generator seed of the draw for token `index` (splitmix64 of the pair, 63 bits)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k and outside the top-p nucleus. logits: [V] float32."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (keeps at least one).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int | None],
) -> list[int]:
    """logits: [n, V] float32 on any device -> one token id per row. `seeds[i]` is row i's
    `token_seed` (None for greedy rows)."""
    greedy = [i for i, p in enumerate(params) if p.greedy]
    tokens = [0] * len(params)
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, rows.argmax(dim=-1).tolist(), strict=True):
            tokens[i] = token
    if len(greedy) < len(params):
        cpu = logits.cpu()
        generator = torch.Generator(device="cpu")
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = filter_logits(cpu[i] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(row, dim=-1)
            seed = seeds[i]
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
            tokens[i] = int(torch.multinomial(probs, 1, generator=generator).item())
    return tokens
