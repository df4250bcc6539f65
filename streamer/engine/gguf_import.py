"""Turn a ``.gguf`` file into an ordinary Hugging Face model folder.

`--model FILE.gguf` works, but transformers parses and dequantizes the file on every start (tens
of seconds for a 135M model on a small CPU). `import_gguf` does that once and writes what
``from_pretrained`` reads fastest: ``config.json``, ``generation_config.json``, the tokenizer
(``tokenizer.json``, its config and the chat template) and the weights, dequantized to `dtype`, as
``model.safetensors``. `--model DIR` then loads it like any other checkpoint.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2-hf")  # float32 by default

The folder is written next to its destination under a temporary name and renamed into place last,
so a folder at the destination is always complete (an interrupted import leaves none).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

IMPORT_RECORD = "streamer-import.json"
"""Written into every imported folder: where it came from and at which dtype."""
DTYPES = ("float32", "bfloat16", "float16")


class GGUFImportError(ValueError):
    """The file cannot be imported; the message says why in one line."""


def check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise GGUFImportError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise GGUFImportError(f"{dest} is not empty (pass --overwrite to replace it)")


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The import record of a folder `import_gguf` wrote, or None."""
    path = Path(folder) / IMPORT_RECORD
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _load_config(src: Path) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from streamer.engine.model import refusal

    try:
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    except (ValueError, KeyError) as exc:
        # e.g. "GGUF model with architecture notanarch is not supported yet."
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise GGUFImportError(f"unsupported architecture in {src}: {reason}") from exc
    reason = refusal(config, MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None))
    if reason is not None:
        raise GGUFImportError(f"unsupported architecture in {src}: {reason}")
    return config


def _load_model(src: Path, config: Any, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from streamer.engine.model import dequantize_kwargs

    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, config=config, dtype=getattr(torch, dtype),
        **dequantize_kwargs(),
    )
    names = {type(m).__name__ for m in model.modules()}
    packed = sorted(n for n in names if "gguf" in n.lower())
    if packed:
        raise GGUFImportError(f"transformers kept {src} packed ({', '.join(packed)}); cannot save")
    # The weights are plain tensors now: forget that they came from a GGUF file, or
    # save_pretrained refuses ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    for holder in (model, model.config):
        for attr in ("quantization_config", "is_quantized", "quantization_method"):
            if attr in holder.__dict__:
                delattr(holder, attr)
    model.config.name_or_path = src.stem
    return model


def import_gguf(
    src: str | Path, dest: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Write the Hugging Face folder for GGUF file `src` at `dest`; returns `dest`.

    Raises `ValueError` (one line) for a missing file, an architecture the engine cannot run,
    or a non-empty `dest` without `overwrite`."""
    src, dest = Path(src).expanduser(), Path(dest).expanduser()
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if not src.is_file():
        raise GGUFImportError(f"GGUF file {src} does not exist")
    if src.suffix.lower() != ".gguf":
        raise GGUFImportError(f"{src} is not a .gguf file")
    check_destination(dest, overwrite)
    try:
        import accelerate  # noqa: F401  (transformers refuses a GGUF file without it)
        import gguf  # noqa: F401  (transformers reads GGUF with it)
    except ImportError as exc:
        raise GGUFImportError(f"importing GGUF needs gguf and accelerate: {exc}") from exc
    from transformers import AutoTokenizer

    config = _load_config(src)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = _load_model(src, config, dtype)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        tokenizer.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json, chat template
        record = {"source": src.name, "source_bytes": src.stat().st_size, "dtype": dtype,
                  "model_type": config.model_type}
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if dest.is_dir() and any(dest.iterdir()):
            if not overwrite and read_record(dest) is not None:
                return dest  # another process imported it meanwhile: keep theirs
            check_destination(dest, overwrite)
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
