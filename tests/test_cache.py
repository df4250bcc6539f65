"""The result cache's parts: keys, entries, the three levels (real Redis, real disk), the facade."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.bench.redis_server import RedisServer
from streamer.cache import entry as entries
from streamer.cache.key import cache_key, cacheable, model_identity
from streamer.cache.levels import DiskLevel, MemoryLevel, RedisLevel
from streamer.cache.tiered import TieredCache
from streamer.engine.outputs import OutputKind
from streamer.engine.sequence import SamplingParams
from streamer.observability.metrics import WorkerMetrics

GREEDY = SamplingParams(max_tokens=8)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_tokens=8)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def _value(metrics: WorkerMetrics, name: str, level: str) -> float:
    return metrics.registry.get_sample_value(f"streamer_cache_{name}_total", {"level": level}) or 0


# ------------------------------------------------------------------ keys


def test_only_deterministic_requests_are_cacheable() -> None:
    assert cacheable(GREEDY)
    assert cacheable(SEEDED)
    assert not cacheable(dataclasses.replace(SEEDED, seed=None))
    with pytest.raises(ValueError):
        cache_key("m", [1, 2], dataclasses.replace(SEEDED, seed=None))


def test_the_key_names_everything_that_changes_the_output() -> None:
    base = cache_key("m", [1, 2, 3], SEEDED)
    assert base == cache_key("m", [1, 2, 3], SEEDED)
    changed = [
        cache_key("other-model", [1, 2, 3], SEEDED),
        cache_key("m", [1, 2, 4], SEEDED),
        *(cache_key("m", [1, 2, 3], dataclasses.replace(SEEDED, **{f: v})) for f, v in (
            ("max_tokens", 9), ("temperature", 0.7), ("top_p", 0.8), ("top_k", 5),
            ("seed", 8), ("stop", ("\n",)), ("ignore_eos", True))),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_greedy_ignores_seed_and_the_sampling_filters() -> None:
    """temperature 0 is argmax whatever seed, top_p, top_k say (DECISIONS rule 8)."""
    base = cache_key("m", [5], GREEDY)
    assert base == cache_key("m", [5], dataclasses.replace(GREEDY, seed=3, top_p=0.5, top_k=4))


def test_model_identity_follows_the_files(tmp_path: Path, tiny_model: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    ident = model_identity(str(copy), "float32", ("cpu",))
    assert ident == model_identity(str(tiny_model), "float32", ("cpu",))  # bytes, not the path
    assert ident != model_identity(str(copy), "bfloat16", ("cpu",))
    assert ident != model_identity(str(copy), "float32", ("cuda:0",))
    config = copy / "config.json"
    config.write_text(config.read_text().replace("}", ', "x": 1}', 1))
    assert model_identity(str(copy), "float32", ("cpu",)) != ident
    with pytest.raises(FileNotFoundError):
        model_identity(str(tmp_path / "absent"), "float32", ("cpu",))


# ------------------------------------------------------------------ entries


def test_an_entry_replays_its_chunks_as_they_were() -> None:
    recorder = entries.Recorder()
    for ids, text in (([1], "a"), ([2, 3, 4], "bcd"), ([5], "")):
        recorder.chunk(ids, text)
    entry = recorder.entry(finish_reason="eos", text="abcd", prompt_tokens=3, completion_tokens=5)
    assert entry is not None
    assert entries.decode(entries.encode(entry)) == entry
    outs = list(entries.ReplayStream("r", entry)._pending)
    assert [o.kind for o in outs] == [OutputKind.STARTED, *[OutputKind.TOKENS] * 3,
                                      OutputKind.FINISHED]
    assert [(o.index, o.token_ids, o.text) for o in outs[1:4]] == [
        (0, [1], "a"), (1, [2, 3, 4], "bcd"), (4, [5], "")]
    assert outs[-1].final_text == "abcd" and outs[-1].num_completion_tokens == 5


def test_chunks_that_do_not_add_up_are_never_stored() -> None:
    recorder = entries.Recorder()
    recorder.chunk([1, 2], "ab")
    assert recorder.entry(finish_reason="length", text="abc", prompt_tokens=1,
                          completion_tokens=2) is None
    assert recorder.entry(finish_reason="length", text="ab", prompt_tokens=1,
                          completion_tokens=3) is None
    assert entries.decode(b"\x01not an entry") is None


# ------------------------------------------------------------------ levels


def test_memory_level_evicts_least_recently_used_past_its_bytes() -> None:
    level = MemoryLevel(max_bytes=10)
    level.put("a", b"1234")
    level.put("b", b"5678")
    assert level.get("a") == b"1234"  # a is now the most recent
    level.put("c", b"90ab")  # 12 bytes would pass 10: b goes
    assert level.get("b") is None and level.get("a") and level.get("c")
    assert level.bytes == 8 and level.evictions == 1
    level.put("huge", b"x" * 11)  # larger than the level: not held, nothing evicted
    assert level.get("huge") is None and len(level) == 2


async def test_redis_level_round_trip_and_ttl(redis_server: RedisServer) -> None:
    level = RedisLevel(redis_server.url, ttl_s=60, timeout_s=1.0)
    try:
        assert await level.get("k") is None
        await level.put("k", b"value")
        assert await level.get("k") == b"value"
        ttl_ms = await level._client.pttl(level.prefix + "k")
        assert 0 < ttl_ms <= 60_000
    finally:
        await level.close()


async def test_disk_level_round_trip_is_bounded(tmp_path: Path) -> None:
    level = DiskLevel(str(tmp_path / "l3"), max_bytes=1 << 20, ttl_s=60)
    try:
        await level.put("k", b"value")
        assert await level.get("k") == b"value"
        assert await level.get("absent") is None
    finally:
        level.close()
    again = DiskLevel(str(tmp_path / "l3"), max_bytes=1 << 20, ttl_s=60)  # survives a restart
    try:
        assert await again.get("k") == b"value"
    finally:
        again.close()


# ------------------------------------------------------------------ the facade


async def test_tiers_fill_every_level_and_promote_hits(redis_server: RedisServer,
                                                       tmp_path: Path) -> None:
    metrics = WorkerMetrics(process_metrics=False)
    l2 = RedisLevel(redis_server.url, ttl_s=60, timeout_s=1.0)
    l3 = DiskLevel(str(tmp_path / "l3"), max_bytes=1 << 20, ttl_s=60)
    tiers = TieredCache([MemoryLevel(1 << 20), l2, l3], metrics)
    try:
        assert await tiers.get("k") is None
        assert [_value(metrics, "misses", lv) for lv in ("l1", "l2", "l3")] == [1, 1, 1]
        tiers.put("k", b"v")
        await tiers.flush()
        assert await tiers.get("k") == ("l1", b"v")
        assert await l2.get("k") == b"v" and await l3.get("k") == b"v"
        # An L3-only entry is found there and copied up to L1 and L2.
        await l3.put("only3", b"w")
        assert await tiers.get("only3") == ("l3", b"w")
        await tiers.flush()
        assert await tiers.get("only3") == ("l1", b"w") and await l2.get("only3") == b"w"
        assert _value(metrics, "hits", "l3") == 1 and _value(metrics, "errors", "l2") == 0
    finally:
        await tiers.stop()


async def test_redis_down_is_a_counted_miss_never_an_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    metrics = WorkerMetrics(process_metrics=False)
    l3 = DiskLevel(str(tmp_path / "l3"), max_bytes=1 << 20, ttl_s=60)
    tiers = TieredCache([MemoryLevel(1 << 20), RedisLevel(server.url, 60, 0.5), l3], metrics)
    try:
        await l3.put("k", b"v")
        server.stop()
        assert await tiers.get("k") == ("l3", b"v")  # L2 failed: a miss, then L3 answers
        assert _value(metrics, "errors", "l2") == 1 and _value(metrics, "misses", "l2") == 1
        tiers.put("k2", b"w")  # writes to a down Redis fail quietly
        await tiers.flush()
        assert await tiers.get("k2") == ("l1", b"w")
        assert await tiers.get("absent") is None  # L2 is skipped for a while: no new error
        assert _value(metrics, "errors", "l2") == 1
    finally:
        server.stop()
        await tiers.stop()


def test_settings_name_the_bad_values() -> None:
    from streamer.config import CacheConfig
    from streamer.settings import load_worker_config

    with pytest.raises(ValueError, match="redis_url"):
        CacheConfig(redis_url="http://x").validate()
    with pytest.raises(ValueError, match="redis_timeout_s"):
        CacheConfig(redis_timeout_s=0).validate()
    config = load_worker_config({"model": "m", "enabled": "true"},
                                {"STREAMER_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert config.cache.enabled and config.cache.redis_url == "redis://127.0.0.1:1/0"
    assert "redis://" not in repr(config)  # it may hold a password
