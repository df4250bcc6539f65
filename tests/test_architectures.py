"""Every decoder family through the engine's stages, token for token against generate().

The engine runs each checkpoint's own forward (streamer/engine/shell.py) with only attention
swapped for the paged one, split into one or two pipeline stages. Tiny random configs made
offline (tests/archs.py) cover Llama, Mistral with a sliding window, Qwen2, Gemma 3, Gemma 2,
Phi-3, GPT-NeoX, gpt-oss, plus GPT-2, OLMo 2 and OPT (absolute positions, a nested layer list).
Architectures that cannot read a paged cache are refused at start, with the reason.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from archs import ARCHS, EOS, decisive_init, save_arch
from transformers import AutoModelForCausalLM

from streamer.config import EngineConfig
from streamer.engine import probe
from streamer.engine.engine import Engine
from streamer.engine.outputs import OutputKind
from streamer.engine.sequence import SamplingParams
from streamer.tiny_model import build_tokenizer, greedy_mismatch

NEW = 10
SMALL = dict(vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS,
             pad_token_id=0)
# More families transformers ships, driven the same way without a line of their own here.
EXTRA: dict[str, Any] = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, **{
        **SMALL, "n_positions": 256, "max_position_embeddings": 256}),
    "olmo2": lambda: transformers.Olmo2Config(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, **SMALL),
    "opt": lambda: transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
        word_embed_proj_dim=64, **SMALL),
}


def _save_extra(name: str, path: Path) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(EXTRA[name](), dtype=torch.float32)
    decisive_init(model, 40.0)
    model.save_pretrained(path)
    build_tokenizer(512).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=ARCHS + list(EXTRA))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[str, Path, Any]:
    name = request.param
    path = tmp_path_factory.mktemp(name)
    if name in EXTRA:
        _save_extra(name, path)
    else:
        save_arch(name, path, tokenizer=True)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return name, path, reference


def _expected(reference: Any, prompt: list[int]) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=EOS, pad_token_id=0)
    gaps = [float(s[0].float().topk(2).values.diff().abs()) for s in out.logits]
    return out.sequences[0, ids.shape[1]:].tolist(), gaps


async def _collect(engine: Engine, rid: str, prompt: list[int]) -> list[int]:
    tokens: list[int] = []
    async for out in engine.add(rid, prompt, SamplingParams(max_tokens=NEW)):
        if out.kind is OutputKind.TOKENS:
            tokens += out.token_ids
    return tokens


@pytest.mark.parametrize("devices", ["cpu", "cpu,cpu"])
async def test_family_matches_generate_through_stages(family: tuple[str, Path, Any],
                                                      devices: str) -> None:
    """Concurrent requests of mixed lengths (chunked prefill, mixed steps, a shared prefix)."""
    name, path, reference = family
    rng = random.Random(7)
    shared = [rng.randrange(3, 500) for _ in range(20)]
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 5, 17, 40)]
    prompts += [[*shared, rng.randrange(3, 500)] for _ in range(2)]
    config = EngineConfig(model=str(path), devices=tuple(devices.split(",")), max_num_seqs=8,
                          max_num_batched_tokens=24, kv_cache_bytes=4 << 20, block_size=4)
    async with Engine(config) as engine:
        assert engine.shape is not None and len(engine.stage_busy_seconds()) == len(
            devices.split(","))
        outputs = await asyncio.gather(*(
            _collect(engine, f"{name}-{i}", p) for i, p in enumerate(prompts)))
        assert engine.blocks is not None and engine.blocks.stats.used_blocks == 0
    for i, (prompt, got) in enumerate(zip(prompts, outputs, strict=True)):
        want, gaps = _expected(reference, prompt)
        problem = greedy_mismatch(want, gaps, got)
        assert problem is None, f"{name} on {devices}, prompt {i} (len {len(prompt)}): {problem}"


def _save(config: Any, path: Path, model_class: Any = AutoModelForCausalLM) -> str:
    model = (model_class(config) if model_class is not AutoModelForCausalLM
             else AutoModelForCausalLM.from_config(config))
    model.save_pretrained(path)
    build_tokenizer(512).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(("name", "reason"), [
    ("mamba", "does not route attention through transformers' AttentionInterface"),
    ("lfm2", r"layers of type \['conv'\]: they keep their own recurrent state"),
    ("t5", "is an encoder-decoder"),
])
async def test_architectures_that_cannot_read_a_paged_cache_are_refused(
        tmp_path: Path, name: str, reason: str) -> None:
    configs: dict[str, Any] = {
        "mamba": lambda: (transformers.MambaConfig(num_hidden_layers=2, hidden_size=64,
                                                   vocab_size=512), AutoModelForCausalLM),
        "lfm2": lambda: (transformers.Lfm2Config(
            num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, full_attn_idxs=[1, 3]), AutoModelForCausalLM),
        "t5": lambda: (transformers.T5Config(num_layers=2, d_model=64, vocab_size=512),
                       transformers.T5ForConditionalGeneration),
    }
    config, model_class = configs[name]()
    path = _save(config, tmp_path, model_class)
    with pytest.raises(ValueError, match=f"cannot serve .*{reason}"):
        async with Engine(EngineConfig(model=path, kv_cache_bytes=4 << 20)):
            pass


async def test_the_start_up_probe_refuses_logits_that_differ(tmp_path: Path) -> None:
    """The probe compares the stages' cached decode with the model's own forward."""
    path = save_arch("llama", tmp_path, tokenizer=True)
    async with Engine(EngineConfig(model=str(path), kv_cache_bytes=4 << 20,
                                   devices=("cpu", "cpu"))) as engine:
        assert engine.pipeline is not None
        stages = engine.pipeline.stages
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        expected = probe.reference_logits(model, probe.probe_ids(512))
        probe.check(stages, expected, torch.float32, "llama")  # the real model's logits pass
        with pytest.raises(ValueError, match="different logits through the paged KV cache"):
            probe.check(stages, expected.roll(1), torch.float32, "llama")
