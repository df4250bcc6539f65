"""Start-up check that the paged path computes the model's own logits.

The engine drives any architecture through its own forward with one attention function swapped
in, and an architecture can still break that contract in ways no config flag shows: layers that
keep recurrent state outside attention (hybrid SSM / convolution models), attention that ignores
`position_ids`, a forward that our stage split does not fit. So before serving, the engine runs a
short prompt through its stages (a prefill, then one decode step that must read the cache) and
compares the last logits with the model's plain forward under transformers' eager attention. A
mismatch refuses the model with the reason; the check costs two forwards of a few tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from streamer.engine.stages import Stage, StepBatch

PROBE_TOKENS = 12  # a prefill of several positions, then one decode step
# Max |paged - eager| allowed, relative to the largest |logit| (float noise is ~1e-6 in float32).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def probe_ids(vocab_size: int) -> list[int]:
    """A fixed prompt of ordinary token ids (skipping the low ids where specials usually sit)."""
    low = min(10, vocab_size - 1)
    return [low + (i * 37) % max(1, vocab_size - low) for i in range(PROBE_TOKENS)]


@torch.inference_mode()
def reference_logits(hf: nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's own last-token logits with eager attention (before stages take its layers)."""
    config = hf.config
    previous = config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        device = next(hf.parameters()).device
        out = hf(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        hf.set_attn_implementation(previous)
    return out.logits[0, -1].float().cpu()


def check(stages: list[Stage], expected: torch.Tensor, dtype: torch.dtype, model_type: str) -> None:
    """Raise ValueError unless the stages' logits match `expected` (uses blocks 0.. of the pools,
    before any sequence owns them)."""
    n = PROBE_TOKENS
    ids = probe_ids(expected.numel())
    block_size = stages[0].pool.block_size if stages[0].pool is not None else n
    table = list(range(-(-n // block_size)))

    def run(chunk: list[int], start: int) -> torch.Tensor:
        batch = StepBatch(
            input_ids=torch.tensor(chunk, dtype=torch.long),
            query_lens=[len(chunk)],
            context_lens=[start + len(chunk)],
            block_tables=[table],
            sample_rows=torch.tensor([len(chunk) - 1]),
            sampler=lambda logits: [],
        )
        hidden = None
        for stage in stages:
            with torch.inference_mode():
                hidden = stage.run(batch, hidden)
        assert hidden is not None
        return hidden[-1].float().cpu()

    run(ids[: n - 1], 0)  # a prefill fills the cache
    got = run(ids[n - 1 :], n - 1)  # one decode step reads it
    scale = float(expected.abs().max()) or 1.0
    err = float((got - expected).abs().max()) / scale
    if not err <= TOLERANCE.get(dtype, 5e-2):
        raise ValueError(
            f"model type {model_type!r} gives different logits through the paged KV cache than "
            f"through its own attention (relative error {err:.2g} after one cached decode step): "
            "it keeps state the cache does not hold (recurrent or convolution layers) or computes "
            "attention in a way the engine cannot drive; it is not supported"
        )
