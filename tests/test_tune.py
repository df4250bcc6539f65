"""`streamer tune`: the adoption rule (pure), config files, and a real tuning run whose winner
a real worker loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from streamer.settings import load_worker_config, read_config_file
from streamer.tune.rule import arm_order, candidates, decide, parse_knobs


def test_a_gain_must_beat_the_threshold_and_the_noise() -> None:
    assert decide([100, 101], [110, 111]).adopt  # +10%, noise 1%
    assert not decide([100, 101], [104, 104]).adopt  # +3.5%: under the 5% threshold
    noisy = decide([80, 120], [110, 112])  # +11%, but the baseline alone spreads 40%
    assert not noisy.adopt and "noise" in noisy.reason
    assert not decide([100, 100], [90, 91]).adopt
    assert decide([0.0, 0.0], [1.0, 2.0]).adopt  # the baseline met no SLO at all
    assert not decide([], [1.0]).adopt


def test_trials_alternate_and_skip_the_current_value() -> None:
    assert arm_order(2) == ["A", "B", "B", "A"]
    assert candidates({"max_num_seqs": (32, 64, 128)}, {"max_num_seqs": 64}) == [
        ("max_num_seqs", 32), ("max_num_seqs", 128)]
    assert candidates({"devices": ("cpu", "cpu,cpu")}, {"devices": ("cpu",)}) == [
        ("devices", "cpu,cpu")]
    assert parse_knobs("max_num_seqs=8/16,block_size", "engine") == {
        "max_num_seqs": (8, 16), "block_size": (16, 32)}
    assert "chunk_ms" not in parse_knobs(None, "engine")
    assert "chunk_ms" in parse_knobs(None, "fleet")
    with pytest.raises(ValueError, match="fleet only"):
        parse_knobs("chunk_ms=0/50", "engine")
    with pytest.raises(ValueError, match="expected one of"):
        parse_knobs("warp_speed=9", "engine")


def test_config_files_sit_under_flags_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "tuned.yaml"
    path.write_text("max_num_seqs: 8\ndevices: cpu,cpu\nchunk_ms: 20\nresume: false\n")
    file = read_config_file(path)
    config = load_worker_config({"model": "m"}, env={}, file=file)
    assert config.engine.max_num_seqs == 8 and config.engine.devices == ("cpu", "cpu")
    assert config.chunk_ms == 20.0 and config.resume is False
    env = {"STREAMER_MAX_NUM_SEQS": "16"}
    assert load_worker_config({"model": "m"}, env=env, file=file).engine.max_num_seqs == 16
    flags = {"model": "m", "max_num_seqs": "32"}
    assert load_worker_config(flags, env=env, file=file).engine.max_num_seqs == 32
    path.write_text("cache: true\ncache_l1_bytes: 1000\n")  # flag names work too
    cached = load_worker_config({"model": "m"}, env={}, file=read_config_file(path))
    assert cached.cache.enabled and cached.cache.l1_bytes == 1000
    path.write_text("max_num_seqz: 8\n")
    with pytest.raises(ValueError, match="unknown settings"):
        read_config_file(path)
    path.write_text("sasl_password: hunter2\n")
    with pytest.raises(ValueError, match="environment"):
        read_config_file(path)
    path.write_text("max_num_seqs: many\n")
    with pytest.raises(ValueError, match="max_num_seqs"):
        load_worker_config({"model": "m"}, env={}, file=read_config_file(path))


@pytest.mark.kafka
def test_tune_writes_a_config_a_worker_loads(tiny_model: Path, tmp_path: Path,
                                             start_worker) -> None:
    out = tmp_path / "tune"
    done = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "tune", "--model", str(tiny_model),
         "--requests", "6", "--output-range", "4:8", "--knobs", "max_num_seqs=8",
         "--repeats", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "tune.json").read_text())
    [trial] = data["trials"]
    assert trial["knob"] == "max_num_seqs" and trial["value"] == 8
    assert len(trial["baseline_scores"]) == len(trial["candidate_scores"]) == 2
    assert all(s > 0 for s in trial["baseline_scores"] + trial["candidate_scores"])
    assert (out / "tune.md").exists() and (out / "tune.png").exists()
    # Whatever won, the file says it, and a worker started with it runs with it.
    winner = read_config_file(out / "tuned.yaml")
    expected = "8" if trial["adopted"] else "64"
    assert winner.get("max_num_seqs", "64") == expected
    (out / "tuned.yaml").write_text("max_num_seqs: 8\nmax_num_batched_tokens: 48\n")
    # The engine logs its configuration as it loads, before the group join (no need to wait).
    worker = start_worker("--config", str(out / "tuned.yaml"), wait=False)
    worker.wait_for('"max_num_batched_tokens": 48')
    assert '"max_num_seqs": 8' in worker.log()
