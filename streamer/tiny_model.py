"""Small, offline Hugging Face causal-LM folders for the demo, tests and benchmarks.

`init_tiny_model` writes a folder that loads with plain ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained``, exactly like a hub checkpoint: ``config.json``,
``generation_config.json``, ``model.safetensors`` (float32, random weights) and a byte-level BPE
tokenizer trained here, in a second or two, on a corpus embedded in this module.

The weights are random but shaped so that the engine can be checked token for token against
transformers' greedy ``generate()``:

* Logits are *decisive*: the final RMSNorm gain (``logit_scale``) spreads logits far apart
  (std ~45), so typical top-1/top-2 gaps (median ~12) dwarf the float noise between batched and
  unbatched runs (~2e-4). Float noise scales with the logits, though, and random logits still
  have rare near-ties; compare engines with `greedy_mismatch`, which forgives only those.
* Weights are normal with std ``init_std * sqrt(128 / fan_in)``, so all widths behave alike.
* Nothing is a no-op the engine could silently skip: RMSNorm weights are not all ones and the
  Qwen2 q/k/v biases are non-zero.
* ``<pad>``, ``<s>`` and ``<|endoftext|>`` are (almost) never predicted; ``</s>`` is slightly
  damped (``eos_scale``), so greedy runs occasionally end but usually run long.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SPEC_FILE = "streamer_tiny_spec.json"
# Bump when the recipe (corpus, init, template...) changes, so ensure_tiny_model rebuilds caches.
RECIPE_VERSION = 2

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# transformers' AutoTokenizer always loads qwen2 folders as Qwen2Tokenizer, which adds this as
# its unk token; having it in the vocabulary keeps len(tokenizer) == vocab_size.
QWEN_UNK = "<|endoftext|>"
# Trained first, so their ids are fixed: pad=0 (what most engines pad with), bos=1, eos=2.
SPECIAL_TOKENS = (PAD, BOS, EOS, QWEN_UNK)
# Qwen2Tokenizer's hard-coded pre-tokenizer split (transformers' tokenization_qwen2.py).
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Byte alphabet + specials: the smallest vocabulary a byte-level BPE can have.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
_MAX_VOCAB = 8192  # the corpus yields ~8k (llama) / ~6.5k (qwen2) tokens; the rest is filler
_REF_WIDTH = 128  # fan-in at which a weight's init std is exactly init_std

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and recipe of a tiny model; saved next to it so `ensure_tiny_model` can reuse it."""

    arch: str = "llama"  # llama | mistral | qwen2
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention by default
    intermediate_size: int = 256
    vocab_size: int = 1024  # size of the locally trained BPE tokenizer
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    # Std of the normal init of a weight matrix with fan-in 128, scaled by sqrt(128 / fan_in)
    # otherwise so every width behaves alike. 0.1 keeps each layer's output O(1), larger than the
    # token embedding, so the layers (not the identity path) pick the next token: with tied
    # embeddings a dominant identity path repeats the input token; much larger and the network
    # turns chaotic, amplifying float noise.
    init_std: float = 0.1
    # Gain of the final RMSNorm: logits spread ~ logit_scale * init_std * sqrt(128) (std ~45).
    # Large on purpose, so top-1/top-2 gaps dwarf absolute float noise (decisive logits).
    logit_scale: float = 40.0
    # Multiplies the </s> embedding row: < 1 makes EOS rarer. At 0.9 about 1 in 30 greedy runs
    # of the tiny llama ends within 160 tokens (at 1.0, 7 in 30, some after 2 tokens).
    eos_scale: float = 0.9
    seed: int = 0
    # Llama only: passed into config.rope_parameters, e.g. {"rope_type": "linear", "factor": 2.0}.
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)

    def validate(self) -> None:
        """Raise ValueError naming every bad value."""
        errors: list[str] = []
        if self.arch not in SUPPORTED_ARCHS:
            errors.append(f"arch={self.arch!r} is not one of {SUPPORTED_ARCHS}")
        sizes = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
                 "max_position_embeddings")
        errors += [f"{name}={getattr(self, name)!r} must be a positive int" for name in sizes
                   if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if not errors:
            if self.hidden_size % self.num_heads:
                errors.append(f"hidden_size={self.hidden_size} is not divisible by "
                              f"num_heads={self.num_heads}")
            elif (self.hidden_size // self.num_heads) % 2:
                errors.append(f"head_dim={self.hidden_size // self.num_heads} must be even (RoPE)")
            if self.num_heads % self.num_kv_heads:
                errors.append(f"num_heads={self.num_heads} is not divisible by "
                              f"num_kv_heads={self.num_kv_heads}")
        if not isinstance(self.vocab_size, int) or not _MIN_VOCAB <= self.vocab_size <= _MAX_VOCAB:
            errors.append(f"vocab_size={self.vocab_size!r} must be an int in "
                          f"[{_MIN_VOCAB}, {_MAX_VOCAB}]")
        for name in ("init_std", "logit_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                errors.append(f"{name}={value!r} must be a positive finite number")
        if not (isinstance(self.eos_scale, int | float) and 0 <= self.eos_scale <= 10):
            errors.append(f"eos_scale={self.eos_scale!r} must be in [0, 10]")
        if self.rope_scaling is not None:
            if self.arch != "llama":
                errors.append(f"rope_scaling is only supported for arch='llama', "
                              f"not {self.arch!r}")
            elif not isinstance(self.rope_scaling, dict) or "rope_type" not in self.rope_scaling:
                errors.append(f"rope_scaling={self.rope_scaling!r} must be a dict with 'rope_type'")
        if errors:
            raise ValueError("invalid TinyModelSpec: " + "; ".join(errors))

    def to_json(self) -> dict[str, Any]:
        """The spec as saved in `SPEC_FILE`, tagged with the recipe version."""
        return {"recipe_version": RECIPE_VERSION, **dataclasses.asdict(self)}


PRESETS: dict[str, TinyModelSpec] = {
    "tiny": TinyModelSpec(),
    # The bench model has a real model's context (8k), so the bench runs it at default settings
    # like a real checkpoint: max_model_len = the model's context.
    "bench": TinyModelSpec(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4,
                           intermediate_size=1408, vocab_size=2048,
                           max_position_embeddings=8192),
}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_BASE_TEXT = """\
The quick brown fox jumps over the lazy dog. A stream of messages flows through the broker,
and every worker reads a slice of it, generates text, and writes the answer back.
Once upon a time, in a small village by the sea, there lived an old fisherman who told stories
to anyone who would listen. The children gathered every evening to hear about storms, whales,
and the lighthouse that never went dark.
Continuous batching keeps the accelerator busy: new requests join the running batch as soon as
older ones finish, instead of waiting for the whole batch to drain.
"How are you today?" she asked. "Fine, thanks! And you?" he replied, smiling.
Water boils at 100 degrees Celsius at sea level; it freezes at 0 degrees.
In 1969, astronauts walked on the Moon for the first time. The mission lasted eight days.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
{"id": 42, "prompt": "Tell me a joke", "max_tokens": 64, "temperature": 0.7}
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC;
Mountains rise above the clouds, rivers carve deep valleys, and forests cover the hills.
The library opens at nine o'clock in the morning and closes at six in the evening.
Please remember to bring your umbrella; the weather report says it will rain this afternoon.
Scientists study the stars, the planets, the oceans, the weather, plants, animals and people.
Music, painting, poetry and dance are among the oldest forms of human expression.
She bought apples, oranges, bananas, bread, cheese, milk and a bottle of olive oil.
Error: connection refused (retrying in 5s)... OK: consumer group rebalanced, 12 partitions.
Café, naïve, résumé, jalapeño, Zürich, São Paulo, Kraków. 東京, 北京, 서울. Привет, мир!
"""

_NOUNS = """
time person year way day thing man world life hand part child eye woman place work week case
point government company number group problem fact water room mother area money story month
lot right study book word business issue side kind head house service friend father power hour
game line end member law car city community name president team minute idea body information
back parent face others level office door health art war history party result change morning
reason research girl guy moment air teacher force education food music river garden window
token model batch stream queue worker request reply partition offset message cache memory layer
"""
_VERBS = """
be have do say get make go know take see come think look want give use find tell ask work seem
feel try leave call keep let begin help talk turn start show hear play run move like live
believe hold bring happen write provide sit stand lose pay meet include continue set learn
"""
_ADJECTIVES = """
good new first last long great little own other old right big high different small large next
early young important few public bad same able quiet bright dark warm cold quick slow happy
"""

_TEMPLATES = (
    "The {a} {n} will {v} the {n2} {adv}.",
    "Why does every {n} {v} a {a} {n2}?",
    "In {year}, {count} {n}s decided to {v} near the {n2}.",
    "She said: \"{A} {n}s never {v} before {hour} o'clock.\"",
    "{A} {n}, {a2} {n2}, and {count} other things.",
    "If you {v} the {n}, then the {n2} becomes {a}; otherwise it stays {a2}.",
    "Step {count}: {v} {n}_{count} = {n2}[{count}] + {hour}",
    "We {v} {count}% of the {n}s in {year} and {hour}.{count} seconds.",
)
_ADVERBS = ("quickly", "slowly", "carefully", "again", "today", "together", "quietly", "soon")
# Made-up names feed merges that digits cannot under Qwen's one-digit-per-token split.
_SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "su", "to", "ni", "be", "za", "or", "el", "an",
              "ri", "co", "du", "fe", "gi", "ha", "ju", "ste", "qua", "bri", "mon", "tal")


def _corpus() -> list[str]:
    """Embedded text plus 4k deterministic template sentences (~200 KB)."""
    rng = random.Random(1234)  # int-seeded random.Random is stable across Python versions
    nouns, verbs, adjectives = _NOUNS.split(), _VERBS.split(), _ADJECTIVES.split()
    lines = _BASE_TEXT.splitlines()
    for _ in range(1500):
        p, p2, p3 = ("".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(3))
        lines.append(f"{p.capitalize()} and {p2} travelled to {p3} with {rng.choice(nouns)}s.")
    for _ in range(2500):
        a, a2 = rng.sample(adjectives, 2)
        lines.append(rng.choice(_TEMPLATES).format(
            a=a, a2=a2, A=a.capitalize(), n=rng.choice(nouns),
            n2=rng.choice(nouns), v=rng.choice(verbs),
            adv=rng.choice(_ADVERBS), year=rng.randint(1800, 2030),
            count=rng.randint(0, 999), hour=rng.randint(1, 12)))
    return lines


def build_tokenizer(vocab_size: int, arch: str = "llama") -> Any:
    """Train a byte-level BPE (BOS-prepending, with a chat template) as a PreTrainedTokenizerFast.

    The vocabulary has exactly `vocab_size` entries, so ids and the model's embedding rows match:
    if the corpus runs out of merges, the rest is filled with plain ``<|extra_N|>`` tokens.
    llama/mistral get GPT-2 style pre-tokenization: any string round-trips exactly. qwen2 gets
    what ``AutoTokenizer`` imposes on every qwen2 folder (Qwen2Tokenizer): NFC normalisation and
    Qwen's split regex, so the saved tokenizer is the one that loads back; like real Qwen2,
    it round-trips NFC text exactly and other text up to NFC.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if arch == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: any input encodes
    tok.train_from_iterator(_corpus(), trainer=trainer)
    shortfall = vocab_size - tok.get_vocab_size()
    if shortfall > 0:
        tok.add_tokens([f"<|extra_{i}|>" for i in range(shortfall)])
    bos_id = tok.token_to_id(BOS)
    # Like Llama: BOS before every sequence (the chat template adds its own, and transformers
    # tokenizes rendered chats with add_special_tokens=False).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        chat_template=CHAT_TEMPLATE, add_bos_token=True, add_eos_token=False,
        # Exact round-trips: no " ." -> "." style clean-up on decode.
        clean_up_tokenization_spaces=False, model_max_length=10**9,
        padding_side="left")  # decoder-only batching pads on the left


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_config(spec: TinyModelSpec, *, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2) -> Any:
    """The transformers config for `spec` (float32, rope_theta 10000, no sliding window)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    spec.validate()
    rope: dict[str, Any] = {"rope_type": "default", **(spec.rope_scaling or {}),
                            "rope_theta": 10000.0}
    common: dict[str, Any] = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
        rope_parameters=rope, initializer_range=spec.init_std,
        tie_word_embeddings=spec.tie_word_embeddings, pad_token_id=pad_id, bos_token_id=bos_id,
        eos_token_id=eos_id, hidden_act="silu", dtype="float32", use_cache=True)
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "mistral":
        # The engine does not implement sliding-window attention yet; None makes transformers
        # attend to the full context too, so both sides compute the same thing.
        return MistralConfig(**common, sliding_window=None)
    return Qwen2Config(**common, use_sliding_window=False, sliding_window=None)


def build_model(spec: TinyModelSpec, *, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2) -> Any:
    """A randomly initialised float32 model for `spec`, deterministic in `spec.seed`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(spec, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
    # fork_rng: transformers' own init draws from the global RNG; keep the caller's state intact.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Re-draw every parameter from our own generator, in a fixed order, so the weights depend
    # only on the spec (not on how a transformers version happens to initialise).
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied lm_head is listed once
            if name.endswith("norm.weight"):
                # Not all ones, so an engine that forgets a norm weight is caught.
                param.uniform_(0.75, 1.25, generator=gen)
                if name == "model.norm.weight":
                    param.mul_(spec.logit_scale)
            elif name.endswith(".bias"):
                # Qwen2 q/k/v biases, ~1/4 the size of W @ x: enough that a dropped bias changes
                # the output, small enough not to pin every prompt to the same continuation.
                std = 0.25 * spec.init_std * math.sqrt(_REF_WIDTH)
                param.normal_(0.0, std, generator=gen)
            else:
                # Linear weights are [out, in]; embeddings [vocab, hidden] (fan-in = hidden).
                fan_in = param.shape[1]
                param.normal_(0.0, spec.init_std * math.sqrt(_REF_WIDTH / fan_in), generator=gen)
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                    }.values():
            # Other special tokens shrunk so they are essentially never predicted; eos per spec.
            for token_id in range(len(SPECIAL_TOKENS)):
                emb.weight[token_id].mul_(spec.eos_scale if token_id == eos_id else 0.1)
    model.generation_config.do_sample = False
    return model.eval()


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def init_tiny_model(path: str | Path, spec: TinyModelSpec = TinyModelSpec(), *,
                    overwrite: bool = False) -> Path:
    """Write config, random weights (safetensors), tokenizer and generation config to `path`.

    Refuses a non-empty folder unless `overwrite`. The folder is built next to `path` and renamed
    into place, so readers (and concurrent `ensure_tiny_model` calls) never see half a model.
    """
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    spec.validate()
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; other users/containers may read the model
        tokenizer = build_tokenizer(spec.vocab_size, spec.arch)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        model = build_model(spec, pad_id=ids[PAD], bos_id=ids[BOS], eos_id=ids[EOS])
        # transformers >= 5 always writes safetensors (model.safetensors), no pickle.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in demo output
        try:
            model.save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        GenerationConfig(do_sample=False, bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                         pad_token_id=ids[PAD]).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n")
        for file in tmp.iterdir():
            file.chmod(0o644)  # some writers create 0600 temp files and rename them
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def saved_spec(path: str | Path) -> dict[str, Any] | None:
    """The spec saved in a model folder, or None if there is no complete model there."""
    path = Path(path)
    needed = ("config.json", "model.safetensors", "tokenizer.json", SPEC_FILE)
    if not all((path / name).is_file() for name in needed):
        return None
    try:
        return json.loads((path / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_tiny_model(path: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Reuse the model at `path` if it was built from `spec` (and this recipe), else rebuild it."""
    path = Path(path)
    # Round-trip through JSON so tuples/lists in the spec compare like the saved file.
    wanted = json.loads(json.dumps(spec.to_json()))
    if saved_spec(path) == wanted:
        return path
    try:
        return init_tiny_model(path, spec, overwrite=True)
    except OSError:
        # Lost a race with another process building the same folder: fine if it built ours.
        if saved_spec(path) == wanted:
            return path
        raise


# --------------------------------------------------------------------------------------------
# Comparing an engine against transformers' greedy decoding
# --------------------------------------------------------------------------------------------


def greedy_reference(model: Any, input_ids: list[int],
                     max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Transformers' greedy continuation of one prompt, and each step's top-1 minus top-2 logit.

    Generation stops at EOS (the EOS token is included) or after `max_new_tokens`.

    The gaps say how robust each token is: an engine whose float noise exceeds a step's gap may
    legitimately pick the other token there (see `greedy_mismatch`).
    """
    import torch

    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    gaps = [float(top[0] - top[1]) for top in (s[0].float().topk(2).values for s in out.logits)]
    return tokens, gaps


def greedy_mismatch(expected: list[int], gaps: list[float], actual: list[int], *,
                    tie_tol: float = 1e-2) -> str | None:
    """Why `actual` fails to reproduce the greedy `expected` tokens, or None if it does.

    A divergence is accepted only at a step whose reference gap is below `tie_tol` (a near-tie
    that float noise may flip); everything before it must match exactly. With the tiny models'
    decisive logits such steps are rare, so tests stay strict without being flaky.
    """
    for step, (want, got) in enumerate(zip(expected, actual, strict=False)):
        if want != got:
            if gaps[step] < tie_tol:
                return None
            return (f"step {step}: expected token {want}, got {got} "
                    f"(reference top-1/top-2 gap {gaps[step]:.4g} >= tie_tol {tie_tol})")
    if len(expected) != len(actual):
        return f"length differs: expected {len(expected)} tokens, got {len(actual)}"
    return None
