"""transformers' own greedy generate(): the reference every engine output is compared with."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    f"{subject} {verb} the {thing} number {i}"
    for i, (subject, verb, thing) in enumerate(
        [("The cat", "watched", "river"), ("A robot", "counted", "stars"),
         ("Our team", "shipped", "release"), ("Kafka", "stored", "message"),
         ("She", "painted", "bridge"), ("The model", "predicted", "token"),
         ("Nobody", "expected", "storm"), ("We", "measured", "latency")] * 4)
]


@lru_cache(maxsize=8)
def _load(path: str):  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return tokenizer, model


def greedy(path: Path | str, prompt: str, max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """Token ids transformers' greedy generate() produces after the prompt (EOS included).

    ignore_eos: generate on past EOS, as the protocol's `ignore_eos` does (no EOS token set)."""
    tokenizer, model = _load(str(path))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    config.pad_token_id = tokenizer.pad_token_id
    if ignore_eos:
        config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1]:].tolist()


def greedy_text(path: Path | str, prompt: str, max_new_tokens: int, ignore_eos: bool = False) -> str:
    tokenizer, _ = _load(str(path))
    return tokenizer.decode(greedy(path, prompt, max_new_tokens, ignore_eos),
                            skip_special_tokens=True)


def max_tokens_for(i: int) -> int:
    """Mixed output lengths, 5..60."""
    return 5 + (i * 11) % 56
