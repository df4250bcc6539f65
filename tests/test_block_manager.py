"""BlockManager: allocation, refcounts, prefix caching, eviction order, invariants, preemption.

The stateful test simulates the KV memory itself: every computed position of a sequence writes
"the prefix up to this token" into its slot, and every cache hit must read back exactly the
prompt's own prefix. That checks hash chains, sharing and eviction end to end."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from streamer.engine.kv.block_manager import BlockManager, OutOfBlocks, block_hash

BS = 4


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def computed(bm: BlockManager, seq: str, tokens: list[int]) -> None:
    """Mark the whole allocated range computed (a full prefill)."""
    bm.mark_computed(seq, len(tokens))


# ------------------------------------------------------------------ allocation and freeing


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, BS)
    assert bm.allocate("a", ids(9)) == 0  # 3 blocks
    assert len(bm.block_table("a")) == 3
    assert bm.stats.used_blocks == 3 and bm.stats.free_blocks == 5
    bm.deallocate("a")
    assert bm.stats.used_blocks == 0 and bm.stats.free_blocks == 8
    bm.check_invariants()


def test_can_allocate_counts_blocks_exactly() -> None:
    bm = BlockManager(3, BS)
    assert bm.can_allocate(ids(12)) and not bm.can_allocate(ids(13))
    with pytest.raises(OutOfBlocks):
        bm.allocate("a", ids(13))
    assert not bm.has("a")
    bm.check_invariants()


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    bm = BlockManager(4, BS)
    with pytest.raises(ValueError):
        bm.allocate("a", [])
    bm.allocate("a", ids(3))
    with pytest.raises(ValueError):
        bm.allocate("a", ids(3))
    with pytest.raises(ValueError):
        bm.mark_computed("a", 4)  # beyond its tokens
    bm.mark_computed("a", 2)
    with pytest.raises(ValueError):
        bm.mark_computed("a", 1)  # backwards


def test_append_adds_a_block_only_at_a_boundary() -> None:
    bm = BlockManager(3, BS)
    bm.allocate("a", ids(3))
    assert bm.can_append("a")
    bm.may_append("a", [3])  # fills block 0
    assert len(bm.block_table("a")) == 1
    bm.may_append("a", [4])  # needs block 1
    assert len(bm.block_table("a")) == 2
    bm.allocate("b", ids(4, 100))  # takes the last block
    bm.may_append("a", [5, 6, 7])  # fits in block 1
    assert not bm.can_append("a")
    with pytest.raises(OutOfBlocks):
        bm.may_append("a", [8])
    assert bm.num_tokens("a") == 8
    bm.check_invariants()


# ------------------------------------------------------------------ prefix caching


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert block_hash(None, [1, 2, 3, 4]) != block_hash(None, [1, 2, 3, 5])
    assert block_hash(a, [1, 2, 3, 4]) != a  # position matters through the chain


def test_shared_prefix_is_shared_and_refcounted() -> None:
    bm = BlockManager(16, BS)
    prompt_a = ids(10)
    assert bm.allocate("a", prompt_a) == 0
    computed(bm, "a", prompt_a)
    prompt_b = [*ids(8), 99, 98, 97]
    assert bm.allocate("b", prompt_b) == 8  # two full blocks shared
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert ta[:2] == tb[:2] and ta[2] != tb[2]
    assert bm.stats.used_blocks == 4  # 3 + 1 private
    bm.deallocate("a")
    assert bm.stats.used_blocks == 3  # b still holds the shared two
    bm.check_invariants()
    bm.deallocate("b")
    bm.check_invariants()
    assert bm.stats.hit_tokens == 8 and bm.stats.query_tokens == 21


def test_never_caches_the_whole_prompt() -> None:
    bm = BlockManager(16, BS)
    prompt = ids(8)
    bm.allocate("a", prompt)
    computed(bm, "a", prompt)
    # The same 8 tokens: only the first block may be reused; the last token needs logits.
    assert bm.allocate("b", prompt) == 4
    assert bm.allocate("c", ids(9)) == 8
    assert bm.allocate("d", ids(1)) == 0


def test_uncomputed_blocks_are_not_hits() -> None:
    bm = BlockManager(16, BS)
    prompt = ids(12)
    bm.allocate("a", prompt)
    assert bm.allocate("b", prompt) == 0  # nothing computed yet
    bm.mark_computed("a", 6)  # one full block computed
    assert bm.allocate("c", prompt) == 4
    bm.check_invariants()


def test_duplicate_blocks_collapse_to_one_copy_when_freed() -> None:
    bm = BlockManager(16, BS)
    prompt = ids(9)
    bm.allocate("a", prompt)
    bm.allocate("b", prompt)  # allocated before a computed: no hits, own blocks
    computed(bm, "a", prompt)
    computed(bm, "b", prompt)
    assert bm.stats.cached_blocks == 4  # both copies of the 2 full blocks are findable
    bm.deallocate("a")  # a's copies give up their content: b still holds the prefix
    assert bm.stats.cached_blocks == 2
    bm.check_invariants()
    assert bm.allocate("c", prompt) == 8
    assert bm.block_table("c")[:2] == bm.block_table("b")[:2]
    bm.deallocate("b")
    bm.deallocate("c")
    assert bm.stats.cached_blocks == 2
    bm.check_invariants()


def test_a_running_copy_keeps_the_prefix_when_the_idle_one_is_evicted() -> None:
    bm = BlockManager(6, BS)
    prompt = ids(5)
    bm.allocate("a", prompt)
    bm.allocate("b", prompt)
    computed(bm, "a", prompt)
    computed(bm, "b", prompt)
    bm.deallocate("a")  # b's copy remains, a's is dropped
    bm.allocate("x", ids(8, 100))  # takes free blocks (evicting whatever is idle)
    assert cached_prefix_blocks(bm, prompt) == 1
    bm.deallocate("b")
    assert bm.allocate("b2", prompt) == 4
    bm.check_invariants()


def cached_prefix_blocks(bm: BlockManager, tokens: list[int]) -> int:
    return len(bm._lookup(tokens)[0])


def test_cached_blocks_survive_free_until_evicted_lru() -> None:
    bm = BlockManager(5, BS)
    a, b = ids(8, 0), ids(8, 100)
    bm.allocate("a", a)
    computed(bm, "a", a)
    bm.allocate("b", b)
    computed(bm, "b", b)
    bm.deallocate("a")  # freed first: evicted first
    bm.deallocate("b")
    assert bm.stats.cached_blocks == 4
    assert cached_prefix_blocks(bm, [*a, 7]) == 2 and cached_prefix_blocks(bm, [*b, 7]) == 2
    # Two fresh blocks: the never-used one, then a's tail (a was freed first, tail first).
    bm.allocate("x", ids(7, 500))
    assert bm.stats.cached_blocks == 3
    assert cached_prefix_blocks(bm, [*a, 7]) == 1 and cached_prefix_blocks(bm, [*b, 7]) == 2
    bm.allocate("y", ids(3, 600))  # then a's head
    assert cached_prefix_blocks(bm, [*a, 7]) == 0 and cached_prefix_blocks(bm, [*b, 7]) == 2
    bm.deallocate("x")  # content-less blocks go back to the head of the queue
    bm.allocate("z", ids(8, 700))
    assert cached_prefix_blocks(bm, [*b, 7]) == 2
    bm.check_invariants()


def test_reusing_a_cached_block_takes_it_out_of_the_free_queue() -> None:
    bm = BlockManager(3, BS)
    a = ids(8)
    bm.allocate("a", a)
    computed(bm, "a", a)
    bm.deallocate("a")
    # 9 tokens = 3 blocks: 2 cached (idle, in the free queue) + 1 fresh: exactly fits.
    assert bm.can_allocate([*a, 1])
    assert bm.allocate("a2", [*a, 1]) == 8
    assert bm.stats.free_blocks == 0
    assert not bm.can_allocate(ids(1, 50))
    bm.check_invariants()


def test_blocks_without_content_are_handed_out_before_cached_ones() -> None:
    bm = BlockManager(4, BS)
    a = ids(8)
    bm.allocate("a", a)
    computed(bm, "a", a)
    bm.allocate("tmp", ids(5, 50))  # never computed: freed without content
    bm.deallocate("a")
    bm.deallocate("tmp")
    bm.allocate("x", ids(7, 900))  # two blocks: the content-less ones
    assert cached_prefix_blocks(bm, [*a, 1]) == 2
    bm.check_invariants()


def test_preemption_reuses_cached_blocks() -> None:
    bm = BlockManager(8, BS)
    prompt = ids(6)
    bm.allocate("s", prompt)
    computed(bm, "s", prompt)
    generated = []
    for t in range(7):  # decode 7 tokens
        bm.may_append("s", [1000 + t])
        generated.append(1000 + t)
        bm.mark_computed("s", bm.num_tokens("s"))
    # Preempt: free, then resume with prompt + output (13 tokens -> 3 full blocks computed).
    bm.deallocate("s")
    assert bm.allocate("s", prompt + generated) == 12
    bm.check_invariants()


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(8, BS, prefix_caching=False)
    prompt = ids(9)
    bm.allocate("a", prompt)
    computed(bm, "a", prompt)
    assert bm.allocate("b", prompt) == 0
    assert bm.stats.cached_blocks == 0


def test_reset_prefix_cache_drops_only_idle_entries() -> None:
    bm = BlockManager(8, BS)
    a, b = ids(9), ids(9, 100)
    for seq, prompt in (("a", a), ("b", b)):
        bm.allocate(seq, prompt)
        computed(bm, seq, prompt)
    bm.deallocate("a")
    assert bm.reset_prefix_cache() == 2
    assert bm.stats.cached_blocks == 2  # b's, in use
    assert bm.allocate("a2", a) == 0
    bm.check_invariants()


# ------------------------------------------------------------------ hit accounting (tokens)


def lookups(bm: BlockManager) -> tuple[int, int, int, int]:
    s = bm.stats
    return s.query_tokens, s.hit_tokens, s.preempted_query_tokens, s.preempted_hit_tokens


def test_shared_prefix_counts_queried_and_hit_tokens() -> None:
    bm = BlockManager(32, BS)
    shared = ids(3 * BS)  # three full blocks
    first = [*shared, 90, 91]
    assert lookups(bm) == (0, 0, 0, 0) and bm.stats.hit_rate == 0.0  # nothing queried yet
    bm.allocate("first", first)
    assert lookups(bm) == (len(first), 0, 0, 0)  # a cold cache: every token queried, none hit
    computed(bm, "first", first)
    for n, tail in enumerate(([80], [81, 82, 83, 84, 85], [86, 87])):
        bm.allocate(f"later{n}", [*shared, *tail])
    queried = len(first) + (3 * BS + 1) + (3 * BS + 5) + (3 * BS + 2)
    assert lookups(bm) == (queried, 3 * 3 * BS, 0, 0)
    assert bm.stats.hit_rate == 3 * 3 * BS / queried
    bm.check_invariants()


def test_partial_blocks_and_the_last_token_are_never_hits() -> None:
    bm = BlockManager(32, BS)
    prompt = ids(2 * BS + 3)  # two full blocks and a partial one
    bm.allocate("a", prompt)
    computed(bm, "a", prompt)
    # Same tokens again: the partial third block is not cached, so only the two full ones hit.
    bm.allocate("b", prompt)
    assert lookups(bm)[:2] == (2 * len(prompt), 2 * BS)
    # A prompt that fills its last block exactly still recomputes that block (the last token
    # must run to give logits), even though the block is cached.
    exact = ids(2 * BS, 100)
    bm.allocate("c", exact)
    computed(bm, "c", exact)
    before = lookups(bm)
    bm.allocate("d", exact)
    assert lookups(bm)[0] - before[0] == 2 * BS and lookups(bm)[1] - before[1] == BS
    # A prompt shorter than one block can never hit.
    tiny = ids(BS - 1, 300)
    bm.allocate("e", tiny)
    computed(bm, "e", tiny)
    before = lookups(bm)
    bm.allocate("f", tiny)
    assert lookups(bm)[1] == before[1]


def test_a_differing_token_ends_the_hit_at_its_block() -> None:
    bm = BlockManager(32, BS)
    base = ids(4 * BS)
    bm.allocate("a", base)
    computed(bm, "a", base)
    changed = list(base)
    changed[2 * BS + 1] = 999  # inside the third block: the chain breaks there
    bm.allocate("b", changed)
    assert lookups(bm)[1] == 2 * BS


def test_resumed_sequences_count_apart_from_the_hit_ratio() -> None:
    bm = BlockManager(32, BS)
    prompt = ids(6)
    bm.allocate("s", prompt)
    computed(bm, "s", prompt)
    for t in range(7):  # decode 7 tokens: 13 tokens, 3 full blocks computed
        bm.may_append("s", [1000 + t])
        bm.mark_computed("s", bm.num_tokens("s"))
    tokens = [*prompt, *range(1000, 1007)]
    bm.deallocate("s")
    assert bm.allocate("s", tokens, resumed=True) == 3 * BS
    # The new-request totals are untouched: a victim re-hitting its own blocks is no evidence
    # that prompts share prefixes. What was recomputed is queried minus hit.
    assert lookups(bm) == (len(prompt), 0, len(tokens), 3 * BS)
    assert bm.stats.hit_rate == 0.0
    bm.check_invariants()


def test_lookups_that_fail_or_only_ask_are_not_counted() -> None:
    bm = BlockManager(2, BS)
    assert bm.can_allocate(ids(5))
    with pytest.raises(OutOfBlocks):
        bm.allocate("big", ids(3 * BS))
    assert lookups(bm) == (0, 0, 0, 0)
    bm.allocate("ok", ids(5))
    assert lookups(bm) == (5, 0, 0, 0)


def test_prefix_caching_off_counts_nothing() -> None:
    bm = BlockManager(8, BS, prefix_caching=False)
    bm.allocate("a", ids(9))
    computed(bm, "a", ids(9))
    bm.allocate("b", ids(9))
    assert lookups(bm) == (0, 0, 0, 0) and bm.stats.hit_rate == 0.0


def test_totals_survive_a_prefix_cache_reset() -> None:
    bm = BlockManager(8, BS)
    prompt = ids(9)
    bm.allocate("a", prompt)
    computed(bm, "a", prompt)
    bm.allocate("b", prompt)
    bm.deallocate("a")
    bm.deallocate("b")
    before = lookups(bm)
    bm.reset_prefix_cache()
    assert lookups(bm) == before == (18, 2 * BS, 0, 0)


def test_block_states_cached_free_and_empty() -> None:
    bm = BlockManager(8, BS)
    prompt = ids(2 * BS + 1)  # 3 blocks, 2 of them full
    bm.allocate("a", prompt)
    computed(bm, "a", prompt)
    s = bm.stats
    assert (s.used_blocks, s.cached_blocks, s.cached_free_blocks) == (3, 2, 0)
    bm.deallocate("a")  # the two full blocks stay reusable; the partial one is empty
    s = bm.stats
    assert (s.used_blocks, s.free_blocks, s.cached_blocks, s.cached_free_blocks) == (0, 8, 2, 2)
    bm.allocate("b", prompt)  # a hit takes both back out of the free queue
    assert (bm.stats.used_blocks, bm.stats.cached_free_blocks) == (3, 0)
    bm.deallocate("b")
    bm.allocate("big", ids(8 * BS, 500))  # takes every block: the cached ones are evicted
    assert (bm.stats.cached_blocks, bm.stats.cached_free_blocks) == (0, 0)
    bm.check_invariants()


# ------------------------------------------------------------------ stateful property test

PREFIXES = [ids(BS * 3, 0), ids(BS * 2, 0) + ids(BS, 50), ids(BS * 2, 200), []]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admissions, chunked prefills, decodes, frees and preemptions against a simulated
    KV memory; every cache hit must read back the sequence's own prefix."""

    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(12, BS)
        self.tokens: dict[str, list[int]] = {}
        self.memory: dict[int, tuple[int, ...]] = {}  # slot -> prefix whose KV it holds
        self.counter = 0
        self.lookups = [0, 0, 0, 0]  # expected query/hit tokens of new, then resumed sequences

    def slot(self, seq: str, pos: int) -> int:
        return self.bm.block_table(seq)[pos // BS] * BS + pos % BS

    def write(self, seq: str, upto: int) -> None:
        """A step computed positions [num_computed, upto) of `seq`."""
        tokens = self.tokens[seq]
        for pos in range(self.bm.num_computed(seq), upto):
            block = self.bm.block_table(seq)[pos // BS]
            assert self.bm._blocks[block].ref_count == 1, "wrote into a shared block"
            self.memory[self.slot(seq, pos)] = tuple(tokens[: pos + 1])
        self.bm.mark_computed(seq, upto)

    def admit(self, seq: str, tokens: list[int], resumed: bool = False) -> bool:
        if not self.bm.can_allocate(tokens):
            with pytest.raises(OutOfBlocks):
                self.bm.allocate(seq, tokens, resumed=resumed)
            return False
        cached = self.bm.allocate(seq, tokens, resumed=resumed)
        assert cached % BS == 0 and cached < len(tokens)
        self.lookups[2 * resumed] += len(tokens)
        self.lookups[2 * resumed + 1] += cached
        self.tokens[seq] = list(tokens)
        for pos in range(cached):
            assert self.memory.get(self.slot(seq, pos)) == tuple(tokens[: pos + 1])
        return True

    @rule(
        target=seqs,
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    )
    def add(self, prefix: list[int], tail: list[int]) -> str:
        self.counter += 1
        seq = f"s{self.counter}"
        return seq if self.admit(seq, prefix + tail) else "rejected"

    @rule(seq=seqs, chunk=st.integers(1, 9))
    def prefill_chunk(self, seq: str, chunk: int) -> None:
        if seq in self.tokens:
            self.write(seq, min(len(self.tokens[seq]), self.bm.num_computed(seq) + chunk))

    @rule(seq=seqs, token=st.integers(0, 3))
    def decode(self, seq: str, token: int) -> None:
        if seq not in self.tokens or self.bm.num_computed(seq) < len(self.tokens[seq]):
            return
        if not self.bm.can_append(seq):
            with pytest.raises(OutOfBlocks):
                self.bm.may_append(seq, [token])
            return
        self.bm.may_append(seq, [token])
        self.tokens[seq].append(token)
        self.write(seq, len(self.tokens[seq]))

    @rule(seq=consumes(seqs))
    def finish(self, seq: str) -> None:
        if seq in self.tokens:
            self.bm.deallocate(seq)
            del self.tokens[seq]

    @rule(seq=seqs)
    def preempt(self, seq: str) -> None:
        if seq not in self.tokens:
            return
        tokens = self.tokens.pop(seq)
        full = self.bm.num_computed(seq) // BS
        self.bm.deallocate(seq)
        assert self.admit(seq, tokens, resumed=True), "re-admitting right after a free must fit"
        # Nothing ran in between, so every computed full block (bar the last token's) is a hit;
        # blocks other sequences computed for the same prefix may add more.
        assert self.bm.num_computed(seq) >= min(full, (len(tokens) - 1) // BS) * BS

    @precondition(lambda self: self.counter % 7 == 3)
    @rule()
    def reset_cache(self) -> None:
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self) -> None:
        self.bm.check_invariants()
        stats = self.bm.stats
        assert stats.used_blocks + stats.free_blocks == stats.num_blocks
        assert 0 <= stats.cached_free_blocks <= min(stats.free_blocks, stats.cached_blocks)
        assert lookups(self.bm) == tuple(self.lookups)
        for seq, tokens in self.tokens.items():
            table = self.bm._tables[seq]
            assert table.token_ids == tokens
            parent = None
            for index, digest in enumerate(table.hashes):  # the hash chain is the content's
                parent = block_hash(parent, tokens[index * BS : (index + 1) * BS])
                assert digest == parent
            for pos in range(self.bm.num_computed(seq)):  # nobody overwrote computed KV
                assert self.memory[self.slot(seq, pos)] == tuple(tokens[: pos + 1])
            # Every computed prefix a running sequence holds can be found by a new prompt.
            full = self.bm.num_computed(seq) // BS
            assert len(self.bm._lookup([*tokens[: full * BS], -1])[0]) == full


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_machine = BlockManagerMachine.TestCase
