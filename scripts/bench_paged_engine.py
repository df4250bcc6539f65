"""16 concurrent requests x 64 tokens through the paged Engine (default settings) vs HF generate().

    PYTHONPATH=. python scripts/bench_paged_engine.py MODEL.gguf [THREADS]
"""

from __future__ import annotations

import asyncio
import sys
import time

import torch

from streamer.config import EngineConfig
from streamer.engine import model as model_lib
from streamer.engine.engine import Engine
from streamer.engine.outputs import OutputKind
from streamer.engine.sequence import SamplingParams

N, NEW = 16, 64
TOPICS = ["Kafka partitions", "paged attention", "the river", "a robot", "CPU caches",
          "prefix caching", "the weather", "pipelines"]


async def engine_run(model: str, prompts: list[list[int]]) -> None:
    engine = Engine(EngineConfig(model=model))
    async with engine:
        b = engine.blocks
        assert b is not None
        tokens = b.num_blocks * b.block_size
        print(f"kv_blocks={b.num_blocks} block_size={b.block_size} tokens={tokens}"
              f" max_model_len={engine.max_model_len}"
              f" full-context sequences that fit={tokens // engine.max_model_len}"
              f" sequences of {len(prompts[0])}+{NEW} tokens that fit="
              f"{b.num_blocks // b.blocks_for(len(prompts[0]) + NEW)}")
        peak = [0, 0.0]
        sched = engine.scheduler
        assert sched is not None
        engine.on_step = lambda plan, _: peak.__setitem__(
            slice(0, 2), [max(peak[0], sched.num_running), max(peak[1], engine.kv_usage)])
        params = SamplingParams(max_tokens=NEW, ignore_eos=True)
        warm = engine.add("warm", prompts[0], SamplingParams(max_tokens=4, ignore_eos=True))
        async for _ in warm:
            pass
        began = time.perf_counter()
        streams = [engine.add(f"r{i}", p, params) for i, p in enumerate(prompts)]
        total = 0
        for s in streams:
            async for out in s:
                if out.kind is OutputKind.FINISHED:
                    total += out.num_completion_tokens
        wall = time.perf_counter() - began
        print(f"engine: {total} tokens in {wall:.2f}s = {total / wall:.1f} tok/s; peak running "
              f"{peak[0]}, peak kv usage {peak[1]:.3%}, prefix hit tokens {b.stats.hit_tokens}")


def hf_run(model: str, prompts: list[list[int]], pad: int) -> None:
    name, kwargs = model_lib.pretrained_args(model)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        hf.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
        began = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                          min_new_tokens=NEW, do_sample=False, pad_token_id=pad)
        wall = time.perf_counter() - began
    total = (out.shape[1] - width) * len(prompts)
    print(f"hf generate batch {len(prompts)}: {total} tokens in {wall:.2f}s = "
          f"{total / wall:.1f} tok/s")


def main() -> None:
    model = sys.argv[1]
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    tok = model_lib.load_tokenizer(model)
    prompts = [tok(f"Write a short note about {TOPICS[i % len(TOPICS)]} number {i}.").input_ids
               for i in range(N)]
    asyncio.run(engine_run(model, prompts))
    hf_run(model, prompts, tok.pad_token_id if tok.pad_token_id is not None else 0)


if __name__ == "__main__":
    main()
