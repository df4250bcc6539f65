"""Paged attention + runner: greedy tokens equal `model.generate(do_sample=False)` per prompt.

Every architecture runs through its own decoder layers with the one registered attention
function: Llama, Mistral with a sliding window, Qwen2 (q/k/v biases), Gemma 3 (sliding and full
layers, a small window), Gemma 2 (attention and final logit soft-capping), Phi-3 (fused qkv and
gate/up projections), GPT-NeoX (fused qkv, partial rotary, parallel residual, LayerNorm) and
gpt-oss (attention sinks, alternating sliding layers, mixture of experts).
Scenarios: batches of different lengths with chunked prefill and mixed prefill + decode steps, a
prefix-cache hit on a shared prefix, and preemption with recompute.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from archs import ARCHS, EOS, decisive_init, tiny_config
from transformers import AttentionInterface, AutoModelForCausalLM

from streamer.engine.attention import (
    ATTENTION_NAME,
    BUCKET_GROWTH,
    BUCKET_SLACK,
    PagedStep,
    decode_buckets,
    paged_attention_forward,
    paged_step,
)
from streamer.engine.kv.block_manager import BlockManager
from streamer.engine.kv.greedy import GreedyStats, generate_greedy
from streamer.engine.kv.pool import KVLayout, KVPool, bytes_per_block
from streamer.engine.kv.runner import PagedRunner, SeqChunk
from streamer.tiny_model import greedy_mismatch

torch.set_num_threads(1)

BS = 4  # small blocks: short prompts span several blocks and share whole ones
NEW = 10
@dataclass
class Arch:
    name: str
    path: Path
    reference: Any  # the same weights with transformers' default attention
    runner: PagedRunner
    _refs: dict[tuple[int, ...], tuple[list[int], list[float]]] = field(default_factory=dict)

    def expected(self, prompt: list[int]) -> tuple[list[int], list[float]]:
        key = tuple(prompt)
        if key not in self._refs:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.reference.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=NEW,
                    output_logits=True,
                    return_dict_in_generate=True,
                    eos_token_id=EOS,
                    pad_token_id=0,
                )
            tokens = out.sequences[0, ids.shape[1] :].tolist()
            gaps = [float(s[0].float().topk(2).values.diff().abs()) for s in out.logits]
            self._refs[key] = tokens, gaps
        return self._refs[key]

    def check(self, prompts: list[list[int]], outputs: list[list[int]]) -> None:
        for i, (prompt, got) in enumerate(zip(prompts, outputs, strict=True)):
            want, gaps = self.expected(prompt)
            problem = greedy_mismatch(want, gaps, got)
            assert problem is None, f"{self.name} prompt {i} (len {len(prompt)}): {problem}"


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Arch:
    config, logit_scale = tiny_config(request.param)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    decisive_init(model, logit_scale)
    model.generation_config.do_sample = False
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = PagedRunner.from_pretrained(path, num_blocks=96, block_size=BS)
    return Arch(request.param, path, reference, runner)


def prompts_of(lengths: list[int], seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def test_batched_chunked_mixed_steps_match_generate(arch: Arch) -> None:
    prompts = prompts_of([1, 3, 9, 17, 30, 41], seed=1)
    kinds: list[tuple[bool, bool]] = []  # per step: (has a prefill chunk, has a decode)
    split = set()

    def record(chunks: list[SeqChunk]) -> None:
        kinds.append(
            (
                any(len(c.token_ids) > 1 for c in chunks),
                any(len(c.token_ids) == 1 and c.start > 0 for c in chunks),
            )
        )
        split.update(c.block_table[0] for c in chunks if c.start > 0 and len(c.token_ids) > 1)

    manager = BlockManager(96, BS)
    outputs = generate_greedy(
        arch.runner,
        manager,
        prompts,
        NEW,
        max_num_seqs=3,
        max_batched_tokens=16,
        eos_token_id=EOS,
        before_step=record,
    )
    arch.check(prompts, outputs)
    assert (True, True) in kinds, "no step mixed prefill chunks with decodes"
    assert split, "no prompt was prefilled in several chunks"
    manager.check_invariants()
    assert manager.stats.used_blocks == 0


def test_prefix_cache_hit_matches_generate(arch: Arch) -> None:
    shared = prompts_of([13], seed=2)[0]  # 3 full blocks + 1 token
    prompts = prompts_of([0, 2, 7, 12], seed=3, prefix=shared)
    manager = BlockManager(96, BS)
    first = generate_greedy(arch.runner, manager, prompts[:1], NEW, eos_token_id=EOS)
    rest = generate_greedy(arch.runner, manager, prompts[1:], NEW, eos_token_id=EOS)
    # The later prompts reuse the 3 shared blocks (the first needed 12 of its 13 tokens).
    assert manager.stats.hit_tokens >= 3 * 12
    arch.check(prompts, first + rest)


def test_preemption_and_recompute_match_generate(arch: Arch) -> None:
    prompts = prompts_of([6, 10, 8, 11, 5], seed=4)
    manager = BlockManager(14, BS)  # 56 slots for ~5 x 19 tokens: sequences get preempted
    stats = GreedyStats()
    outputs = generate_greedy(
        arch.runner,
        manager,
        prompts,
        NEW,
        max_num_seqs=5,
        max_batched_tokens=32,
        eos_token_id=EOS,
        stats=stats,
    )
    assert stats.preemptions > 0
    arch.check(prompts, outputs)
    manager.check_invariants()


def test_step_creates_no_hf_cache(arch: Arch) -> None:
    step, ids = arch.runner.prepare([SeqChunk([5, 6, 7], 0, [0]), SeqChunk([8], 2, [1])])
    with paged_step(step), torch.inference_mode():
        out = arch.runner.model(
            input_ids=ids[None], position_ids=step.positions[None], use_cache=False
        )
    assert out.cache is None and list(out.keys()) == ["logits"]


# ------------------------------------------------------------------ single-architecture checks


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config, scale = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    decisive_init(model, scale)
    path = tmp_path_factory.mktemp("llama16")
    model.save_pretrained(path)
    return path


def test_default_block_size_and_budget(llama: Path) -> None:
    config = AutoModelForCausalLM.from_pretrained(llama).config
    per_block = bytes_per_block(config)  # 16 tokens x 4 layers x K+V x 2 heads x 32 x fp32
    assert per_block == 16 * 4 * 2 * 2 * 32 * 4
    runner = PagedRunner.from_pretrained(llama, kv_cache_bytes=40 * per_block + 1)
    assert runner.num_blocks == 40 and runner.block_size == 16
    assert runner.pool.nbytes == 40 * per_block
    reference = AutoModelForCausalLM.from_pretrained(llama).eval()
    arch = Arch("llama/16", llama, reference, runner)
    prompts = prompts_of([5, 20, 33, 2], seed=5)
    manager = BlockManager(runner.num_blocks, 16)
    outputs = generate_greedy(
        runner, manager, prompts, NEW, max_batched_tokens=24, eos_token_id=EOS
    )
    arch.check(prompts, outputs)


def test_no_dense_mask_reaches_attention(llama: Path) -> None:
    seen: list[Any] = []

    def spy(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kw: Any) -> Any:
        seen.append(attention_mask)
        return paged_attention_forward(module, query, key, value, attention_mask, **kw)

    runner = PagedRunner.from_pretrained(llama, num_blocks=8)
    AttentionInterface.register(ATTENTION_NAME, spy)
    try:
        runner.step([SeqChunk(list(range(3, 20)), 0, [0, 1]), SeqChunk([5], 3, [2])])
    finally:
        AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    assert len(seen) == 4 and all(mask is None for mask in seen)


def test_runner_refuses_a_model_with_another_attention(llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama)
    pool = KVPool(KVLayout.from_config(model.config), 4)
    with pytest.raises(ValueError, match="attn_implementation"):
        PagedRunner(model, pool)


def test_attention_outside_a_step_fails_loudly(llama: Path) -> None:
    runner = PagedRunner.from_pretrained(llama, num_blocks=4)
    with pytest.raises(RuntimeError, match="paged_step"):
        runner.model(input_ids=torch.tensor([[3, 4]]), use_cache=False)


def test_layout_refuses_non_attention_layers() -> None:
    config, _ = tiny_config("gemma3")
    config.layer_types = ["linear_attention", *config.layer_types[1:]]
    with pytest.raises(ValueError, match="linear_attention"):
        KVLayout.from_config(config)


# ------------------------------------------------------------------ the attention function alone


class _Module(torch.nn.Module):
    def __init__(self, layer_idx: int, sinks: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_causal = True
        if sinks is not None:
            self.sinks = sinks


def _naive(q, k, v, start, scale, window, softcap, sinks):  # type: ignore[no-untyped-def]
    """One sequence, per query head, straight from the definition. q: [n, Hq, D]; k, v: [L, Hkv, D]."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.empty_like(q)
    for h in range(hq):
        scores = (q[:, h] @ k[:, h // group].T) * scale  # [n, L]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(start, start + n)[:, None]
        keys = torch.arange(k.shape[0])[None, :]
        visible = keys <= pos
        if window is not None:
            visible &= keys > pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks[h].expand(n, 1)], dim=1)
            probs = scores.softmax(-1)[:, :-1]
        else:
            probs = scores.softmax(-1)
        out[:, h] = probs @ v[:, h // group]
    return out


@pytest.mark.parametrize(
    ("window", "softcap", "use_sinks"),
    [(None, None, False), (5, None, False), (None, 3.0, False), (7, 2.0, True)],
)
def test_paged_attention_equals_the_definition(window, softcap, use_sinks) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 6, 2, 8, 4
    layout = KVLayout((0,), hkv, d, bs, torch.float64)
    pool = KVPool(layout, 64)
    # A decode with 12 cached tokens, a chunk of 5 after 6 cached, a fresh prompt, a decode after
    # 3, a chunk of 3 after 14 (its window starts two blocks in), a decode after 59 (long enough
    # to be attended in a bucket of its own).
    starts, lens = [12, 6, 0, 3, 14, 59], [1, 5, 7, 1, 3, 1]
    tables = [[3, 9, 1, 4], [0, 7, 12], [20, 21], [30], [5, 6, 8, 10, 11], list(range(40, 55))]
    history = [
        torch.randn(s + n, 2, hkv, d, generator=gen, dtype=torch.float64)
        for s, n in zip(starts, lens, strict=True)
    ]  # k/v of every position
    k_cache, v_cache = pool.layer(0)
    for s, table, kv in zip(starts, tables, history, strict=True):  # what earlier steps wrote
        for p in range(s):
            k_cache[table[p // bs], p % bs] = kv[p, 0]
            v_cache[table[p // bs], p % bs] = kv[p, 1]
    q = torch.randn(sum(lens), hq, d, generator=gen, dtype=torch.float64)
    new_k = torch.cat([kv[s:, 0] for s, kv in zip(starts, history, strict=True)])
    new_v = torch.cat([kv[s:, 1] for s, kv in zip(starts, history, strict=True)])
    sinks = torch.randn(hq, generator=gen, dtype=torch.float64) if use_sinks else None
    step = PagedStep(pool, lens, [s + n for s, n in zip(starts, lens, strict=True)], tables)
    assert [d.rows.tolist() for d in step.decodes] == [[13, 0], [17]]  # decode rows, by length
    with paged_step(step):
        out, _ = paged_attention_forward(
            _Module(0, sinks),
            q.transpose(0, 1)[None],
            new_k.transpose(0, 1)[None],
            new_v.transpose(0, 1)[None],
            None,
            scaling=0.3,
            sliding_window=window,
            softcap=softcap,
        )
    row = 0
    for s, n, kv in zip(starts, lens, history, strict=True):
        want = _naive(q[row : row + n], kv[:, 0], kv[:, 1], s, 0.3, window, softcap, sinks)
        torch.testing.assert_close(out[0, row : row + n], want)
        row += n


def test_decode_buckets_bound_the_padding() -> None:
    rng = random.Random(3)
    for _ in range(200):
        blocks = [rng.choice([1, 2, 3, 40, 41, 90, 500]) + rng.randrange(3) for _ in range(12)]
        items = list(range(100, 112))
        groups = decode_buckets(items, blocks)
        assert sorted(i for g in groups for i in g) == items
        for group in groups:
            own = [blocks[i - 100] for i in group]
            assert max(own) <= max(BUCKET_GROWTH * min(own), min(own) + BUCKET_SLACK)
    assert decode_buckets([7, 8, 9], [30, 31, 33]) == [[7, 8, 9]]  # similar lengths: one call
    assert decode_buckets([], []) == []


def test_step_rejects_tables_that_do_not_cover_the_context() -> None:
    pool = KVPool(KVLayout((0,), 1, 4, 4), 4)
    with pytest.raises(ValueError, match="do not fit"):
        PagedStep(pool, [2], [9], [[0, 1]])  # 9 positions, 8 slots
