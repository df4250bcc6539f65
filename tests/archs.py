"""Tiny random configs of every decoder family the engine is tested on, with weights that make
greedy choices decisive (float noise between attention implementations cannot flip them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from streamer.tiny_model import TinyModelSpec, build_config, build_tokenizer

EOS = 2
SMALL: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=EOS,
)
ARCHS = ["llama", "mistral_swa", "qwen2", "gemma3", "gemma2", "phi3", "gpt_neox", "gpt_oss"]


def tiny_config(arch: str) -> tuple[Any, float]:
    """A tiny config and the logit scale that makes its greedy choices decisive."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPTNeoXConfig,
        GptOssConfig,
        Phi3Config,
    )

    if arch in ("llama", "qwen2"):
        return build_config(TinyModelSpec(arch=arch)), 40.0
    if arch == "mistral_swa":
        config = build_config(TinyModelSpec(arch="mistral"))
        config.sliding_window = 6
        return config, 40.0
    gemma = dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,
        hidden_activation="gelu_pytorch_tanh",
    )
    layers = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    if arch == "gemma3":
        return Gemma3TextConfig(**SMALL, **gemma, layer_types=layers), 40.0
    if arch == "gemma2":
        # A low attention cap so that it changes scores; the final cap squeezes the logits.
        config = Gemma2Config(
            **SMALL,
            **gemma,
            layer_types=layers,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0,
        )
        return config, 8.0
    if arch == "phi3":
        small = {**SMALL, "num_hidden_layers": 2}
        return Phi3Config(**small, original_max_position_embeddings=256), 40.0
    if arch == "gpt_oss":  # attention sinks, alternating sliding layers, MoE
        small = {**SMALL, "num_hidden_layers": 2}
        config = GptOssConfig(
            **small,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        return config, 40.0
    if arch == "gpt_neox":
        small = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
        return GPTNeoXConfig(**small, rotary_pct=0.25, use_parallel_residual=True), 40.0
    raise ValueError(arch)


def decisive_init(model: Any, logit_scale: float, seed: int = 0) -> None:
    """tiny_model's recipe for any architecture: O(1) layer outputs and logits spread far apart,
    so float noise between attention implementations cannot flip a greedy choice."""
    gemma = model.config.model_type.startswith("gemma")  # RMSNorm scales by (1 + weight)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            final = name.endswith(("model.norm.weight", "final_layer_norm.weight"))
            if param.ndim >= 2:
                fan_in = param.shape[1]
                param.normal_(0.0, 0.1 * math.sqrt(128 / fan_in), generator=gen)
            elif name.endswith("sinks"):
                param.normal_(0.0, 1.0, generator=gen)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.05, generator=gen)
            elif gemma:
                param.uniform_(-0.25, 0.25, generator=gen)
                if final:
                    param.copy_(logit_scale * (1 + param) - 1)
            else:
                param.uniform_(0.75, 1.25, generator=gen)
                if final:
                    param.mul_(logit_scale)


ARCHS = ["llama", "mistral_swa", "qwen2", "gemma3", "gemma2", "phi3", "gpt_neox", "gpt_oss"]


def save_arch(arch: str, path: Path, *, tokenizer: bool = False) -> Path:
    """Write `arch`'s tiny model (and, for the engine, a tokenizer of its vocabulary) to `path`."""
    config, logit_scale = tiny_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    decisive_init(model, logit_scale)
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    if tokenizer:
        build_tokenizer(config.vocab_size).save_pretrained(path)
    return path
