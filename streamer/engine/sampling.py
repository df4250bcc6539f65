"""Turn logits into tokens with each request's own parameters.

Greedy rows share one argmax. Sampled rows each use their own torch.Generator, seeded from the
request, so a seeded request's tokens depend on the request alone, never on its batch-mates.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from streamer.engine.sequence import SamplingParams


def new_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None  # greedy ignores seed
    generator = torch.Generator(device="cpu")
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


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
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """logits: [n, V] float32 on any device -> one token id per row."""
    greedy = [i for i, p in enumerate(params) if p.greedy]
    tokens = [0] * len(params)
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, rows.argmax(dim=-1).tolist(), strict=True):
            tokens[i] = token
    if len(greedy) < len(params):
        cpu = logits.cpu()
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = filter_logits(cpu[i] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(row, dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens
