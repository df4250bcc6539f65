"""A minimal synchronous driver of `BlockManager` + `PagedRunner`: greedy decoding of a list of
prompts with continuous batching, chunked prefill, prefix caching and preemption.

It is the reference for how a scheduler plugs the two together (tests and the benchmark use it),
not the engine's scheduler: no priorities, sampling, streaming or pipelining. Per step:
1. running sequences first, in admission order: a decode needs a slot for its pending token
   (`can_append` / `may_append`); if none is free the newest running sequence is preempted
   (`deallocate`, back to the front of the queue, recomputed later from its cached prefix);
   a sequence still prefilling takes its next chunk;
2. waiting sequences are admitted while `can_allocate` and the token budget allow;
   `allocate` says how many prompt tokens are already cached, and prefill starts there;
3. the runner computes the step; `mark_computed` publishes the newly full blocks to the prefix
   cache; sequences whose step reached their last token take the argmax as their next token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from streamer.engine.kv.block_manager import BlockManager
from streamer.engine.kv.runner import PagedRunner, SeqChunk


@dataclass(eq=False)
class _Seq:
    seq_id: str
    tokens: list[int]  # prompt + output; the last one may still lack a slot
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    num_computed: int = 0
    preemptions: int = 0


@dataclass
class GreedyStats:
    steps: int = 0
    tokens: int = 0  # tokens computed (prefill + decode)
    preemptions: int = 0
    step_sizes: list[int] = field(default_factory=list)


def generate_greedy(
    runner: PagedRunner,
    manager: BlockManager,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    max_num_seqs: int = 16,
    max_batched_tokens: int = 256,
    eos_token_id: int | None = None,
    stats: GreedyStats | None = None,
    before_step: Callable[[list[SeqChunk]], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (EOS included when reached), as `generate()` gives."""
    if manager.block_size != runner.block_size or manager.num_blocks > runner.num_blocks:
        raise ValueError("the block manager and the runner's pool disagree on blocks")
    stats = stats if stats is not None else GreedyStats()
    seqs = [_Seq(f"p{i}", list(p), max_new_tokens) for i, p in enumerate(prompts)]
    waiting: deque[_Seq] = deque(seqs)
    running: list[_Seq] = []

    def preempt(seq: _Seq) -> None:
        manager.deallocate(seq.seq_id)
        running.remove(seq)
        seq.num_computed = 0
        seq.preemptions += 1
        stats.preemptions += 1
        waiting.appendleft(seq)

    while waiting or running:
        plan: list[tuple[_Seq, int]] = []
        budget = max_batched_tokens
        for seq in running.copy():  # preemption removes from `running`
            if seq not in running or budget == 0:  # preempted meanwhile, or step is full
                continue
            if manager.num_tokens(seq.seq_id) < len(seq.tokens):  # pending sampled token
                while not manager.can_append(seq.seq_id):
                    victim = running[-1]
                    preempt(victim)
                    if victim is seq:
                        break
                if seq not in running:
                    continue
                manager.may_append(seq.seq_id, seq.tokens[-1:])
            n = min(len(seq.tokens) - seq.num_computed, budget)
            plan.append((seq, n))
            budget -= n
        while waiting and budget > 0 and len(running) < max_num_seqs:
            seq = waiting[0]
            if not manager.can_allocate(seq.tokens):
                if not running:
                    raise RuntimeError(f"{seq.seq_id} needs more KV blocks than exist")
                break
            waiting.popleft()
            seq.num_computed = manager.allocate(seq.seq_id, seq.tokens, resumed=seq.preemptions > 0)
            running.append(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            plan.append((seq, n))
            budget -= n
        plan = [(seq, n) for seq, n in plan if seq in running]  # drop preempted ones

        chunks = [
            SeqChunk(
                seq.tokens[seq.num_computed : seq.num_computed + n],
                seq.num_computed,
                manager.block_table(seq.seq_id),
            )
            for seq, n in plan
        ]
        if before_step is not None:
            before_step(chunks)
        logits = runner.step(chunks)
        stats.steps += 1
        stats.tokens += sum(n for _, n in plan)
        stats.step_sizes.append(sum(n for _, n in plan))
        next_ids = logits.argmax(dim=-1).tolist()

        for (seq, n), token in zip(plan, next_ids, strict=True):
            seq.num_computed += n
            manager.mark_computed(seq.seq_id, seq.num_computed)
            if seq.num_computed < len(seq.tokens):
                continue  # mid-prompt chunk: its logits are not sampled
            seq.output.append(token)
            seq.tokens.append(token)  # gets its slot at the start of the next step
            if len(seq.output) >= seq.max_new_tokens or token == eos_token_id:
                manager.deallocate(seq.seq_id)
                running.remove(seq)
    return [seq.output for seq in seqs]
