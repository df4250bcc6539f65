"""The one owner of KV memory: fixed-size blocks, reference counts, per-sequence block tables and
prefix caching. Pure Python: no torch, no asyncio, so it is unit-tested with hundreds of cases in
milliseconds.

Vocabulary
- A *block* holds the keys and values of `block_size` consecutive tokens of one sequence, in every
  layer of every pipeline stage (each stage's `KVPool` has the same number of blocks).
- A sequence's *block table* lists its blocks in order: token at position p lives in block
  `table[p // block_size]` at offset `p % block_size` (its *slot* is `block * block_size + offset`).
- A block is *full* when all its positions hold tokens and *computed* when their keys and values
  have been written (the caller says so with `mark_computed`).

Prefix caching
- A full, computed block gets a content hash chained over the whole prefix:
  ``hash_i = H(hash_{i-1}, token ids of block i)``, so equal hashes mean equal prefixes, not merely
  equal blocks. The hash map sends a hash to the blocks that hold that prefix: one, or while
  sequences that computed the same prefix concurrently are running, each one's copy (a freed
  copy gives up its content if another remains, so at most one idle copy is kept).
- `allocate` reuses the longest chain of cached blocks that starts the prompt, but never the whole
  prompt: at least its last token is computed, so the step has logits to sample from.
- A freed block keeps its hash and stays reusable until the free queue evicts it. The queue is in
  LRU order: blocks without content are handed out first, then cached blocks in the order they
  were freed (a sequence's blocks are freed tail first, so a shared prefix outlives its tails).
- Only full blocks are shared, and a sequence only writes after its cached prefix, so a shared
  block is never written: no copy-on-write is needed.

Hit accounting (vLLM's semantics, in tokens)
- Each successful `allocate` is one lookup: *queried* = every token it was given, *hit* = the
  cached tokens it returns. Hits are whole blocks, and never the last token: a partly filled block
  is never a hit, and a prompt repeated exactly still recomputes its last token (its whole last
  block when the prompt fills it), so the ratio stays below 1. `can_allocate` looks, uncounted.
- A sequence re-admitted after preemption (`allocate(..., resumed=True)`) is counted apart, in
  the `preempted_*` totals: it mostly hits its own blocks again, which says nothing about how
  much prompts share, so the headline ratio `hit_tokens / query_tokens` covers new requests
  only. `preempted_query_tokens - preempted_hit_tokens` is what preemption made the engine
  recompute.
- With prefix caching off nothing is looked up and nothing is counted.
- The totals only grow (`reset_prefix_cache` keeps them): read them as counters.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_BLOCK_SIZE = 16


class OutOfBlocks(RuntimeError):
    """Raised by `allocate` / `may_append` when the free queue cannot cover the request.

    Callers ask `can_allocate` / `can_append` first; this is the guard against a caller bug."""


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """Chained content hash of a full block: 128-bit BLAKE2b of the parent's hash and the ids.

    Deterministic across processes (unlike Python's `hash` of str), so a hash can later name a
    block outside this process (offloading, routing by prefix)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"\x00" if parent is None else b"\x01" + parent.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    """Prefix hash of its content while the block is in the prefix cache (full and computed)."""


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    """Every token that has a slot (prompt and appended tokens)."""
    num_computed: int = 0
    hashes: list[int] = field(default_factory=list)
    """Chained hashes of the first len(hashes) blocks (full and computed)."""


@dataclass(frozen=True)
class KVCacheStats:
    num_blocks: int
    used_blocks: int
    """Blocks referenced by at least one sequence."""
    free_blocks: int
    """Blocks in the free queue (including cached ones that can still be reused)."""
    cached_blocks: int
    """Blocks registered in the prefix cache (used or free)."""
    cached_free_blocks: int
    """Free blocks that still hold a cached prefix: a hit reuses them, eviction takes them last.
    `free_blocks - cached_free_blocks` are free and empty."""
    query_tokens: int
    """Tokens looked up by `allocate` for sequences admitted for the first time, since start."""
    hit_tokens: int
    """Of those, tokens found cached (prefill skipped them)."""
    preempted_query_tokens: int
    """Tokens looked up by `allocate` for sequences resumed after preemption, since start."""
    preempted_hit_tokens: int
    """Of those, tokens found cached (the rest was recomputed)."""

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """`hit_tokens / query_tokens` (new sequences only); 0.0 before the first lookup."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class BlockManager:
    """Blocks, reference counts and block tables; nothing else mutates them.

    Lifecycle of a sequence (what a scheduler calls):
        can_allocate(ids) -> allocate(seq_id, ids) -> cached tokens (prefill starts there)
        after each step that wrote keys/values:   mark_computed(seq_id, num_computed)
        before each decode step:                  can_append(seq_id) -> may_append(seq_id, [tok])
        finished or preempted:                    deallocate(seq_id)
    A preempted sequence is re-admitted with `allocate(seq_id, prompt + output)`: its computed full
    blocks are usually still cached, so only the tail is recomputed.
    """

    def __init__(
        self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, *, prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Free queue: the head is handed out (evicted) first. OrderedDict gives O(1) removal of a
        # cached block from the middle when a new sequence reuses it.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Prefix hash -> the blocks holding that prefix (an ordered set). Usually one; sequences
        # that computed the same prefix concurrently hold copies until all but one are freed.
        self._cache: dict[int, dict[int, None]] = {}
        self._tables: dict[str, _Table] = {}
        # Kept up to date by every change of a block's hash or refcount, so `stats` is O(1).
        self._num_cached = 0
        self._num_cached_free = 0
        # Hit accounting (module docstring): [query, hit] tokens of new and of resumed sequences.
        self._lookups = [0, 0]
        self._preempted_lookups = [0, 0]

    # ------------------------------------------------------------------ queries

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> tuple[int, ...]:
        return tuple(self._tables[seq_id].blocks)

    def num_tokens(self, seq_id: str) -> int:
        return len(self._tables[seq_id].token_ids)

    def num_computed(self, seq_id: str) -> int:
        return self._tables[seq_id].num_computed

    @property
    def stats(self) -> KVCacheStats:
        free = len(self._free)
        return KVCacheStats(
            num_blocks=self.num_blocks,
            used_blocks=self.num_blocks - free,
            free_blocks=free,
            cached_blocks=self._num_cached,
            cached_free_blocks=self._num_cached_free,
            query_tokens=self._lookups[0],
            hit_tokens=self._lookups[1],
            preempted_query_tokens=self._preempted_lookups[0],
            preempted_hit_tokens=self._preempted_lookups[1],
        )

    # ------------------------------------------------------------------ allocation

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether `allocate(_, token_ids)` would succeed now."""
        return self._fits(self._lookup(token_ids)[0], len(token_ids))

    def _fits(self, hits: list[int], num_tokens: int) -> bool:
        # A cached hit that nobody uses sits in the free queue: reusing it takes it out too.
        idle_hits = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return self.blocks_for(num_tokens) - len(hits) <= len(self._free) - idle_hits

    def allocate(self, seq_id: str, token_ids: Sequence[int], *, resumed: bool = False) -> int:
        """Give `seq_id` slots for `token_ids`; return how many leading tokens are cached.

        The cached count is a multiple of `block_size` and below `len(token_ids)`: prefill runs
        from there (the positions before it already hold the right keys and values).
        `resumed`: the sequence was preempted before, so the lookup counts in the `preempted_*`
        totals rather than the hit ratio's."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        hits, hashes = self._lookup(token_ids)
        if not self._fits(hits, len(token_ids)):
            raise OutOfBlocks(
                f"{self.blocks_for(len(token_ids))} blocks wanted, {len(self._free)} free"
            )
        table = _Table(token_ids=list(token_ids), hashes=hashes)
        for block_id in hits:
            self._ref(block_id)
        table.blocks = hits + [
            self._take_free() for _ in range(self.blocks_for(len(token_ids)) - len(hits))
        ]
        table.num_computed = len(hits) * self.block_size
        self._tables[seq_id] = table
        if self.prefix_caching:
            lookups = self._preempted_lookups if resumed else self._lookups
            lookups[0] += len(token_ids)
            lookups[1] += table.num_computed
        return table.num_computed

    def can_append(self, seq_id: str, num_new_tokens: int = 1) -> bool:
        table = self._tables[seq_id]
        needed = self.blocks_for(len(table.token_ids) + num_new_tokens) - len(table.blocks)
        return needed <= len(self._free)

    def may_append(self, seq_id: str, token_ids: Sequence[int]) -> None:
        """Give the new tokens (usually the one just sampled) slots, adding blocks if needed."""
        if not self.can_append(seq_id, len(token_ids)):
            raise OutOfBlocks(f"no free block to append {len(token_ids)} token(s) to {seq_id!r}")
        table = self._tables[seq_id]
        table.token_ids.extend(token_ids)
        while len(table.blocks) < self.blocks_for(len(table.token_ids)):
            table.blocks.append(self._take_free())

    def mark_computed(self, seq_id: str, num_computed: int) -> None:
        """The keys and values of the first `num_computed` tokens are written (call it when the
        step that wrote them has completed). Newly full blocks enter the prefix cache."""
        table = self._tables[seq_id]
        if not table.num_computed <= num_computed <= len(table.token_ids):
            raise ValueError(
                f"num_computed={num_computed} for {seq_id!r} must lie in "
                f"[{table.num_computed}, {len(table.token_ids)}]"
            )
        table.num_computed = num_computed
        bs = self.block_size
        for index in range(len(table.hashes), num_computed // bs):
            parent = table.hashes[-1] if table.hashes else None
            digest = block_hash(parent, table.token_ids[index * bs : (index + 1) * bs])
            table.hashes.append(digest)
            if self.prefix_caching:
                self._drop_idle_copies(digest)  # this running block replaces them
                block_id = table.blocks[index]
                self._blocks[block_id].hash = digest
                self._cache.setdefault(digest, {})[block_id] = None
                self._num_cached += 1

    def deallocate(self, seq_id: str) -> None:
        """Release a finished or preempted sequence's blocks (cached ones stay reusable)."""
        table = self._tables.pop(seq_id)
        for block_id in reversed(table.blocks):  # tail first: it is evicted before the prefix
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is not None:
                    self._num_cached_free += 1
                    if len(self._cache[block.hash]) > 1:
                        self._forget(block)  # another block holds this prefix: keep only that one
                if block.hash is None:  # nothing worth keeping: hand it out first
                    self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no sequence uses (e.g. after new weights are loaded);
        blocks in use keep their entries. Returns how many entries were dropped."""
        dropped = 0
        for block_id in list(self._free):
            block = self._blocks[block_id]
            if block.hash is not None:
                self._forget(block)
                self._free.move_to_end(block_id, last=False)
                dropped += 1
        return dropped

    # ------------------------------------------------------------------ internals

    def _lookup(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Blocks (and their hashes) holding the longest cached prefix of full blocks, stopping
        before the last token."""
        if not self.prefix_caching:
            return [], []
        bs = self.block_size
        hits: list[int] = []
        hashes: list[int] = []
        parent: int | None = None
        for index in range((len(token_ids) - 1) // bs):
            parent = block_hash(parent, token_ids[index * bs : (index + 1) * bs])
            holders = self._cache.get(parent)
            if not holders:
                break
            hits.append(next(iter(holders)))
            hashes.append(parent)
        return hits, hashes

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
            if block.hash is not None:
                self._num_cached_free -= 1
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash is not None:  # evict: this copy of its prefix is gone
            self._forget(block)
        block.ref_count = 1
        return block_id

    def _drop_idle_copies(self, digest: int) -> None:
        for block_id in [b for b in self._cache.get(digest, ()) if not self._blocks[b].ref_count]:
            self._forget(self._blocks[block_id])
            self._free.move_to_end(block_id, last=False)

    def _forget(self, block: _Block) -> None:
        assert block.hash is not None
        holders = self._cache[block.hash]
        del holders[block.block_id]
        if not holders:
            del self._cache[block.hash]
        block.hash = None
        self._num_cached -= 1
        if block.ref_count == 0:
            self._num_cached_free -= 1

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests and debugging)."""
        refs = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            if len(table.blocks) != self.blocks_for(len(table.token_ids)):
                raise AssertionError(
                    f"{seq_id}: {len(table.blocks)} blocks for {len(table.token_ids)} tokens"
                )
            if len(set(table.blocks)) != len(table.blocks):
                raise AssertionError(f"{seq_id}: a block appears twice in its table")
            if len(table.hashes) != table.num_computed // self.block_size:
                raise AssertionError(
                    f"{seq_id}: {len(table.hashes)} hashes for {table.num_computed} computed tokens"
                )
            for block_id in table.blocks:
                refs[block_id] += 1
        for block in self._blocks:
            if block.ref_count != refs[block.block_id]:
                raise AssertionError(
                    f"block {block.block_id}: ref_count {block.ref_count} but "
                    f"{refs[block.block_id]} table references"
                )
            if (block.ref_count == 0) != (block.block_id in self._free):
                raise AssertionError(
                    f"block {block.block_id}: ref_count {block.ref_count}, "
                    f"in free queue: {block.block_id in self._free}"
                )
            if block.hash is None:
                continue
            holders = self._cache.get(block.hash, {})
            if block.block_id not in holders:
                raise AssertionError(f"block {block.block_id}: hash not mapped to it")
            if block.ref_count == 0 and len(holders) > 1:
                raise AssertionError(f"free block {block.block_id} duplicates a cached prefix")
        for digest, holders in self._cache.items():
            if not holders or any(self._blocks[b].hash != digest for b in holders):
                raise AssertionError(f"cache entry {digest:x} has a stale or empty holder set")
        cached = [b for b in self._blocks if b.hash is not None]
        cached_free = sum(1 for b in cached if b.ref_count == 0)
        if (self._num_cached, self._num_cached_free) != (len(cached), cached_free):
            raise AssertionError(
                f"counted {self._num_cached} cached / {self._num_cached_free} cached-free blocks, "
                f"found {len(cached)} / {cached_free}"
            )
        if not 0 <= self._lookups[1] <= self._lookups[0]:
            raise AssertionError(f"hit tokens exceed query tokens: {self._lookups}")
        if not 0 <= self._preempted_lookups[1] <= self._preempted_lookups[0]:
            raise AssertionError(f"preempted hits exceed queries: {self._preempted_lookups}")
