"""Throughput of the paged runner against transformers' batched `generate()` on a tiny model.

    python -m streamer.engine.kv.bench --preset tiny --batch 16 --prompt-len 32 --new-tokens 64

Both sides decode greedily, the same prompts (equal lengths, so `generate` needs no padding),
every sequence for exactly `--new-tokens` tokens (EOS does not stop either). Reports generated
tokens per second (best of `--repeats`) and how many continuations are identical.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from streamer.engine.kv.block_manager import BlockManager
    from streamer.engine.kv.greedy import GreedyStats, generate_greedy
    from streamer.engine.kv.runner import PagedRunner
    from streamer.tiny_model import PRESETS, build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of N runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    spec = PRESETS[args.preset]
    rng = random.Random(0)
    prompts = [
        [rng.randrange(4, spec.vocab_size) for _ in range(args.prompt_len)]
        for _ in range(args.batch)
    ]
    with tempfile.TemporaryDirectory() as path:
        build_model(spec).save_pretrained(path)
        reference = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
        reference.generation_config.eos_token_id = None  # like the paged loop: never stop early
        per_seq = -(-(args.prompt_len + args.new_tokens) // args.block_size)
        num_blocks = per_seq * args.batch + 1
        runner = PagedRunner.from_pretrained(
            path, num_blocks=num_blocks, block_size=args.block_size, device=args.device
        )

    def run_paged() -> tuple[list[list[int]], GreedyStats]:
        stats = GreedyStats()
        out = generate_greedy(
            runner,
            BlockManager(num_blocks, args.block_size, prefix_caching=False),
            prompts,
            args.new_tokens,
            max_num_seqs=args.batch,
            max_batched_tokens=args.batch * args.prompt_len,
            stats=stats,
        )
        return out, stats

    def run_hf() -> list[list[int]]:
        ids = torch.tensor(prompts, device=args.device)
        with torch.inference_mode():
            out = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=args.new_tokens,
            )
        return out[:, args.prompt_len :].tolist()

    generated = args.batch * args.new_tokens
    results = {}
    for name, fn in (("paged runner", run_paged), ("hf generate", run_hf)):
        fn()  # warm-up
        elapsed = float("inf")
        for _ in range(args.repeats):
            began = time.perf_counter()
            out = fn()
            elapsed = min(elapsed, time.perf_counter() - began)
        results[name] = out[0] if isinstance(out, tuple) else out
        print(f"{name:>13}: {generated / elapsed:8.1f} generated tok/s ({elapsed:.2f} s)")
    same = sum(a == b for a, b in zip(*results.values(), strict=True))
    print(f"identical continuations: {same}/{args.batch}")


if __name__ == "__main__":
    main()
