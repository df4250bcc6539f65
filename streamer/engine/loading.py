"""The model side of start-up: weights, the layer split into stages, the KV pools, the probe.

`load_stages` is everything that touches weights or KV memory. The engine calls it on a thread of
its own process, or the model process (`engine/remote.py`) calls it, and hands back only what
the engine's host side needs (`ModelSummary`): the scheduler and the block manager never see a
weight, and a process that hosts the model never sees a request.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import torch

from streamer.config import EngineConfig
from streamer.engine import model as model_lib
from streamer.engine import probe
from streamer.engine.kv.pool import KVLayout
from streamer.engine.shell import StageShell
from streamer.engine.stages import Stage

log = structlog.get_logger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class ModelSummary:
    """What the host side needs of a loaded model (picklable: it crosses the process boundary)."""

    shape: model_lib.ModelShape
    dtype: str
    eos_ids: frozenset[int] | None
    """The generation config's end-of-sequence ids; None: it names none (the tokenizer's)."""
    ranges: tuple[range, ...]
    num_blocks: int
    bytes_per_block: int


def load_stages(cfg: EngineConfig) -> tuple[list[Stage], ModelSummary]:
    """Load the checkpoint, split its layers over `cfg.devices`, allocate each stage's KV pool
    and run the start-up probe. Raises ValueError for a model or budget the engine cannot
    serve."""
    model_lib.check_devices(cfg.devices)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    dtype = model_lib.resolve_dtype(cfg.dtype, cfg.devices)
    hf, shape = model_lib.load_model(cfg.model, dtype)
    eos = hf.generation_config.eos_token_id if hf.generation_config else None
    eos_ids = None if eos is None else frozenset(eos if isinstance(eos, list) else [eos])
    groups = len(cfg.devices)
    ranges = model_lib.split_layers(shape.num_layers, groups, cfg.layer_split)
    # Weights first, then the KV budget: on CUDA it is a fraction of what the weights left.
    # The model's own logits first: the stages then take its layers (and hook them).
    expected = probe.reference_logits(hf, probe.probe_ids(shape.vocab_size))
    stages = [
        Stage(
            i,
            torch.device(device),
            StageShell(hf, layers, torch.device(device), first=i == 0, last=i == groups - 1),
            layers,
        )
        for i, (device, layers) in enumerate(zip(cfg.devices, ranges, strict=True))
    ]
    layouts = [
        KVLayout.from_config(hf.config, layers=r, block_size=cfg.block_size, dtype=dtype)
        for r in ranges
    ]
    per_block = sum(layout.bytes_per_block for layout in layouts)
    budget = cfg.kv_cache_bytes or default_kv_budget(cfg)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV-cache budget {budget} bytes holds no block of {per_block} bytes "
            f"({cfg.block_size} tokens in {shape.num_layers} layers): raise kv_cache_bytes"
        )
    for stage, layout in zip(stages, layouts, strict=True):
        stage.allocate_kv(layout, num_blocks)
    probe.check(stages, expected, dtype, shape.model_type)
    summary = ModelSummary(shape, str(dtype).removeprefix("torch."), eos_ids, tuple(ranges),
                           num_blocks, per_block)
    return stages, summary


def default_kv_budget(cfg: EngineConfig) -> int:
    cuda = [d for d in cfg.devices if d.startswith("cuda")]
    if not cuda:
        return CPU_DEFAULT_KV_BYTES
    free = sum(torch.cuda.mem_get_info(torch.device(d))[0] for d in sorted(set(cuda)))
    return int(free * cfg.kv_cache_fraction)
