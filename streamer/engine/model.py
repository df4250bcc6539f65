"""Load a Hugging Face causal LM and split it into pipeline stages.

Any decoder-only architecture whose attention goes through transformers' `AttentionInterface` runs
here: the model is loaded with ``attn_implementation="streamer_paged"`` and each stage calls the
checkpoint's own forward (streamer/engine/shell.py), so norms, rotary variants, fused projections,
sliding windows and soft-capping are the model's code. Only the attention function is ours
(streamer/engine/attention.py), because it reads the engine's paged KV cache. What cannot be
driven that way is refused here, saying why, and `streamer.engine.probe` checks at start that the
paged path gives the model's own logits.

`model` is a Hugging Face folder or hub id, or a path to a ``.gguf`` file: transformers reads the
file's config, tokenizer and (dequantized) weights, so the same code runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from streamer.engine.kv.pool import ATTENTION_LAYER_TYPES

log = structlog.get_logger(__name__)

# Families checked token for token against transformers in the test suite (tiny random configs).
TESTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt_oss",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    model_type: str


def resolve_dtype(name: str, devices: tuple[str, ...]) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if all(d.startswith("cuda") for d in devices) and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_devices(devices: tuple[str, ...]) -> None:
    for device in devices:
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r} requested but CUDA is not available")
            index = torch.device(device).index or 0
            if index >= torch.cuda.device_count():
                raise ValueError(
                    f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
                )
        elif device != "cpu":
            raise ValueError(f"unknown device {device!r}; use cpu or cuda:N")


def is_gguf(model: str) -> bool:
    return model.lower().endswith(".gguf")


def pretrained_args(model: str) -> tuple[str, dict[str, Any]]:
    """`(name_or_folder, kwargs)` for ``from_pretrained``: a ``.gguf`` file becomes its folder
    and ``gguf_file=<name>``; anything else passes through unchanged."""
    if not is_gguf(model):
        return model, {}
    path = Path(model).expanduser()
    if not path.is_file():
        raise ValueError(f"GGUF file {model!r} does not exist")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:
        raise ValueError(f"loading {model!r} needs the gguf package: pip install gguf") from exc
    return str(path.resolve().parent), {"gguf_file": path.name}


def dequantize_kwargs() -> dict[str, Any]:
    """Ask transformers for plain dense weights from a GGUF file (with the `kernels` package
    installed, newer releases would otherwise keep GGUF blocks packed)."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always dequantizes
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    name, kwargs = pretrained_args(model)
    return AutoTokenizer.from_pretrained(name, **kwargs)


def load_config(model: str) -> Any:
    name, kwargs = pretrained_args(model)
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except ValueError as exc:
        if kwargs:  # e.g. "GGUF model with architecture X is not supported yet."
            raise ValueError(f"cannot load GGUF file {model!r}: {exc}") from exc
        raise


def refusal(config: Any, model_class: type | None) -> str | None:
    """Why the engine cannot drive this architecture, or None."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        return f"model type {model_type!r} is an encoder-decoder; only decoder-only LMs are served"
    if model_class is None:
        return f"model type {model_type!r} has no causal-LM class in transformers"
    if not getattr(model_class, "_supports_attention_backend", False):
        return (
            f"{model_class.__name__} ({model_type!r}) does not route attention through "
            "transformers' AttentionInterface, so its layers cannot read the paged KV cache"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config or getattr(config, "vision_config", None) is not None:
        return f"model type {model_type!r} is multimodal; serve its text-only model instead"
    kinds = sorted(
        {k for k in getattr(text, "layer_types", None) or () if k not in ATTENTION_LAYER_TYPES}
    )
    if kinds:
        return (
            f"model type {model_type!r} has layers of type {kinds}: they keep their own "
            "recurrent state, which the paged KV cache does not hold"
        )
    return None


def load_model(model: str, dtype: torch.dtype) -> tuple[nn.Module, ModelShape]:
    config = load_config(model)
    model_type = getattr(config, "model_type", "?")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    reason = refusal(config, model_class)
    if reason is not None:
        raise ValueError(f"cannot serve {model!r}: {reason}")
    name, kwargs = pretrained_args(model)
    if kwargs:  # a GGUF file, dequantized on load (to `dtype`): the engine runs float weights
        kwargs.update(dequantize_kwargs())
    from streamer.engine.attention import register_paged_attention

    hf = AutoModelForCausalLM.from_pretrained(
        name, config=config, dtype=dtype, attn_implementation=register_paged_attention(), **kwargs
    )
    hf.eval()
    text_config = hf.config.get_text_config()
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    # Sliding-window layers need no cap: the paged attention applies each layer's window.
    context = int(getattr(text_config, "max_position_embeddings", 2048))
    if model_type not in TESTED_MODEL_TYPES:
        log.warning(
            "model_type_untested",
            model_type=model_type,
            tested=",".join(TESTED_MODEL_TYPES),
            note="served through its own layers; the start-up probe checked its logits",
        )
    shape = ModelShape(
        num_layers=text_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        hidden_size=text_config.hidden_size,
        vocab_size=text_config.vocab_size,
        context_length=context,
        model_type=model_type,
    )
    return hf, shape


def split_layers(num_layers: int, num_stages: int, split: tuple[int, ...] | None) -> list[range]:
    """Layer ranges per stage: even by default (earlier stages take the remainder)."""
    if split is None:
        base, extra = divmod(num_layers, num_stages)
        split = tuple(base + (1 if i < extra else 0) for i in range(num_stages))
    if len(split) != num_stages or sum(split) != num_layers or min(split) < 1:
        raise ValueError(
            f"layer split {split} must give each of {num_stages} stages at least one layer "
            f"and add up to {num_layers}"
        )
    ranges, start = [], 0
    for count in split:
        ranges.append(range(start, start + count))
        start += count
    return ranges
