"""Tiny offline models: hub-compatible folders, exact tokenizer, decisive greedy logits."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from streamer.tiny_model import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    PRESETS,
    SPEC_FILE,
    SUPPORTED_ARCHS,
    TinyModelSpec,
    build_model,
    build_tokenizer,
    ensure_tiny_model,
    greedy_mismatch,
    greedy_reference,
    init_tiny_model,
)

PROMPTS = [
    "Hello", "The quick brown fox", "Once upon a time", "def main():", "SELECT * FROM",
    "What is the capital of France?", "1 2 3 4", "Kafka streams", "東京 is a city", "🙂 emoji",
    "In 1969,", "Error:",
]
UNICODE_SAMPLES = [
    "hello world",
    "  leading, trailing and   inner spaces  \n\n\ttabs\r\n",
    "Café naïve résumé Zürich São Paulo",
    "e\u0301 a\u0308 \u0915\u094d\u0937 x\u0301\u0302 combining marks",  # NFD, Devanagari
    "東京タワー 北京 서울 ภาษาไทย",
    "🙂👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 emoji, skin tones and ZWJ sequences",
    "مرحبا بالعالم עברית right-to-left",
    "\x00\x01\x7f control \u200b zero width \ufeff bom \U0010ffff",
    "<not-special> <s1> </ s> <|user|> look-alikes",
    "",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a busy machine OpenMP spinning makes
    them 10-20x slower; restore the setting for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, _one_thread: None) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: init_tiny_model(root / arch, TinyModelSpec(arch=arch))
            for arch in SUPPORTED_ARCHS}


@pytest.fixture(scope="module")
def loaded(model_dirs: dict[str, Path]) -> dict[str, tuple]:
    return {arch: (AutoModelForCausalLM.from_pretrained(path).eval(),
                   AutoTokenizer.from_pretrained(path)) for arch, path in model_dirs.items()}


@pytest.fixture(scope="module")
def references(loaded: dict[str, tuple]) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Greedy continuations (tokens, top-1/top-2 gaps) of every prompt, per arch."""
    return {arch: [greedy_reference(model, tok(p).input_ids, 32) for p in PROMPTS]
            for arch, (model, tok) in loaded.items()}


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_folder_loads_like_a_hub_model(model_dirs: dict[str, Path], loaded: dict[str, tuple],
                                       arch: str) -> None:
    path, (model, tok) = model_dirs[arch], loaded[arch]
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin")), "weights must be safetensors only"
    assert json.loads((path / SPEC_FILE).read_text())["arch"] == arch

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == arch
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 4, 1024)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.rms_norm_eps == 1e-6
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.tie_word_embeddings
    if arch != "llama":
        assert config.sliding_window is None
    assert next(model.parameters()).dtype == torch.float32

    ids = {t: tok.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS)}
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (ids[PAD], ids[BOS], ids[EOS])
    assert len(tok) == config.vocab_size
    assert type(tok).__name__ == ("Qwen2Tokenizer" if arch == "qwen2" else "TokenizersBackend")
    for cfg in (config, model.generation_config):
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert model.generation_config.do_sample is False

    # Nothing the engine could skip unnoticed: norm weights are not ones, qwen2 biases non-zero.
    params = dict(model.named_parameters())
    assert not torch.allclose(params["model.layers.0.input_layernorm.weight"], torch.ones(128))
    q_bias = params.get("model.layers.0.self_attn.q_proj.bias")
    assert (q_bias is not None and q_bias.abs().mean() > 0.05) == (arch == "qwen2")

    enc = tok(["Hello there", "A much longer prompt about Kafka"], return_tensors="pt",
              padding=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, enc.input_ids.shape[1] + 8)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_save_load_reproduces_logits(loaded: dict[str, tuple], arch: str) -> None:
    """A freshly built model (same seed) equals the saved one: init is deterministic."""
    model, tok = loaded[arch]
    fresh = build_model(TinyModelSpec(arch=arch))
    ids = tok(PROMPTS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(fresh(**ids).logits, model(**ids).logits)
        other = build_model(TinyModelSpec(arch=arch, seed=1))
        assert not torch.allclose(other(**ids).logits, model(**ids).logits)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_unicode_round_trips(loaded: dict[str, tuple], arch: str) -> None:
    _, tok = loaded[arch]
    fresh = build_tokenizer(1024, arch)  # what init_tiny_model saved is what loads back
    for text in UNICODE_SAMPLES:
        ids = tok(text).input_ids
        assert ids == fresh(text).input_ids
        # qwen2 folders load as Qwen2Tokenizer, which (like real Qwen2) NFC-normalises input.
        want = unicodedata.normalize("NFC", text) if arch == "qwen2" else text
        assert tok.decode(ids, skip_special_tokens=True) == want, text
        assert tok.decode(ids[1:]) == want, text
    # Byte-level: single tokens may be partial UTF-8, the concatenation is still exact.
    emoji = "👨‍👩‍👧‍👦"
    pieces = tok(emoji, add_special_tokens=False).input_ids
    assert len(pieces) > 1 and tok.decode(pieces) == emoji


def test_bos_prepended_eos_not(loaded: dict[str, tuple]) -> None:
    _, tok = loaded["llama"]
    ids = tok("hello").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids
    assert tok("hello", add_special_tokens=False).input_ids == ids[1:]
    assert tok.decode(ids) == "<s>hello"


def test_chat_template(loaded: dict[str, tuple]) -> None:
    model, tok = loaded["qwen2"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
    assert tok.chat_template == CHAT_TEMPLATE
    no_prompt = tok.apply_chat_template(chat, tokenize=False)
    assert no_prompt == text.removesuffix("<|assistant|>\n")
    ids = tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS, not two
    assert ids == tok(text, add_special_tokens=False).input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == len(ids) + 4


def test_init_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        init_tiny_model(tmp_path / "m")
    init_tiny_model(tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "keep.txt").exists()
    (tmp_path / "empty").mkdir()
    assert (init_tiny_model(tmp_path / "empty") / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_ensure_reuses_then_rebuilds(tmp_path: Path) -> None:
    path = tmp_path / "model"
    spec = TinyModelSpec(num_layers=2, vocab_size=512)
    assert ensure_tiny_model(path, spec) == path
    weights = path / "model.safetensors"

    def file_identity() -> tuple[int, int]:
        stat = weights.stat()
        return stat.st_ino, stat.st_mtime_ns

    before, content = file_identity(), weights.read_bytes()
    ensure_tiny_model(path, spec)
    assert file_identity() == before  # reused, not rewritten

    ensure_tiny_model(path, dataclasses.replace(spec, seed=7))  # different spec: rebuilt
    assert json.loads((path / SPEC_FILE).read_text())["seed"] == 7
    # New weights (by content: two writes within one clock tick can share an mtime).
    assert weights.read_bytes() != content

    saved = json.loads((path / SPEC_FILE).read_text())
    (path / SPEC_FILE).write_text(json.dumps({**saved, "recipe_version": -1}))
    ensure_tiny_model(path, dataclasses.replace(spec, seed=7))  # stale recipe: rebuilt
    assert json.loads((path / SPEC_FILE).read_text()) == saved

    weights.unlink()  # incomplete folder: rebuilt
    ensure_tiny_model(path, dataclasses.replace(spec, seed=7))
    assert weights.is_file()


@pytest.mark.parametrize(("changes", "message"), [
    ({"arch": "gpt2"}, "arch='gpt2'"),
    ({"num_layers": 0}, "num_layers=0"),
    ({"hidden_size": 130}, "hidden_size=130"),
    ({"hidden_size": 120, "num_heads": 8}, "head_dim=15"),
    ({"num_kv_heads": 3}, "num_kv_heads=3"),
    ({"vocab_size": 100}, "vocab_size=100"),
    ({"vocab_size": 10**6}, "vocab_size=1000000"),
    ({"init_std": 0.0}, "init_std=0.0"),
    ({"logit_scale": float("nan")}, "logit_scale=nan"),
    ({"arch": "mistral", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "only supported for arch='llama'"),
    ({"rope_scaling": {"factor": 2.0}}, "rope_type"),
])
def test_validate_names_bad_values(changes: dict, message: str) -> None:
    spec = dataclasses.replace(TinyModelSpec(), **changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        spec.validate()


def test_validate_reports_every_error() -> None:
    with pytest.raises(ValueError, match=r"arch='x'.*vocab_size=1"):
        TinyModelSpec(arch="x", vocab_size=1).validate()


def test_presets_and_rope_scaling(tmp_path: Path) -> None:
    for spec in PRESETS.values():
        spec.validate()
    assert PRESETS["tiny"] == TinyModelSpec()
    scaled = TinyModelSpec(num_layers=2, rope_scaling={"rope_type": "linear", "factor": 4.0})
    config = AutoConfig.from_pretrained(init_tiny_model(tmp_path / "rope", scaled))
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0,
                                      "rope_theta": 10000.0}
    ids = torch.arange(3, 40)[None]
    plain = build_model(dataclasses.replace(scaled, rope_scaling=None))
    with torch.no_grad():
        assert not torch.allclose(build_model(scaled)(ids).logits, plain(ids).logits)


# Decisive logits. Float noise scales with the logits, so gaps are judged against the noise
# measured here: a left-padded batch vs one-at-a-time runs (<= 2.2e-4 measured, logit std ~46).
# Random logits give near-ties at a rate ~ 3.7 * gap / std per step, so the minimum over many
# steps is a lottery (30 prompts x 40 steps: 0.024 llama/mistral, 0.0125 qwen2); its fixed-seed
# value here is asserted at > 10x the noise bound, and the bulk via quantiles that any recipe
# keeps. Engine tests should compare with `greedy_mismatch`, which forgives only near-ties.
MAX_BATCH_NOISE = 5e-4
MIN_GAP = 10 * MAX_BATCH_NOISE


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_greedy_logits_are_decisive(loaded: dict[str, tuple], references: dict, arch: str) -> None:
    model, tok = loaded[arch]
    enc = tok(PROMPTS, return_tensors="pt", padding=True)  # left padding
    with torch.no_grad():
        batched = model(**enc).logits[:, -1]
        noise = max(float((model(**tok(p, return_tensors="pt")).logits[0, -1] - batched[i])
                          .abs().max()) for i, p in enumerate(PROMPTS))
    assert noise < MAX_BATCH_NOISE, f"{arch}: batched vs single logits differ by {noise:.3g}"

    gaps = torch.tensor([gap for _, step_gaps in references[arch] for gap in step_gaps])
    assert gaps.min() > MIN_GAP, f"{arch}: min gap {gaps.min():.4g}"
    assert (gaps < 0.1).float().mean() < 0.02  # measured ~0.5%
    assert gaps.median() > 5  # measured 11-13


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_greedy_outputs_vary(references: dict, arch: str) -> None:
    runs = [tokens for tokens, _ in references[arch]]
    assert len({tuple(t) for t in runs}) == len(runs), "prompts must continue differently"
    assert all(len(set(t)) > 1 for t in runs), "a run is one repeated token"
    assert sum(len(set(t)) for t in runs) / len(runs) > 6  # measured 14-22 over 40 steps


def test_eos_is_rare_but_reachable(loaded: dict[str, tuple], references: dict) -> None:
    eos = loaded["llama"][1].eos_token_id
    runs = [tokens for arch in SUPPORTED_ARCHS for tokens, _ in references[arch]]
    assert sum(eos in tokens for tokens in runs) <= len(runs) // 10  # long runs are the norm
    model, tok = loaded["llama"]
    # Measured: greedy "zzz" on the default llama/mistral ends with EOS after 106 tokens.
    out = model.generate(**tok(["zzz"], return_tensors="pt"), max_new_tokens=160,
                         do_sample=False)
    assert eos in out[0, 20:].tolist()


def test_greedy_mismatch_tolerates_only_near_ties() -> None:
    expected, gaps = [5, 6, 7, 8], [3.0, 0.001, 2.0, 2.0]
    assert greedy_mismatch(expected, gaps, [5, 6, 7, 8]) is None
    assert greedy_mismatch(expected, gaps, [5, 9, 1]) is None  # diverged at a near-tie
    assert "step 2" in (greedy_mismatch(expected, gaps, [5, 6, 1, 8]) or "")
    assert "length" in (greedy_mismatch(expected, gaps, [5, 6, 7]) or "")


def test_greedy_reference_matches_generate(loaded: dict[str, tuple], references: dict) -> None:
    model, tok = loaded["mistral"]
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=32, do_sample=False)[:, enc.input_ids.shape[1]:]
    for row, (tokens, gaps) in zip(out.tolist(), references["mistral"][:3], strict=True):
        assert greedy_mismatch(tokens, gaps, row[: len(tokens)]) is None
