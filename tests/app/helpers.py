"""Helpers for service tests, shared with the reliability tests: test adapters and servers.

Adapters are made with ``init_lora_weights=False`` so that an answer scored with the wrong
adapter differs visibly from the right one. Nothing here imports the ``training`` package.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from nli.labels import LABELS
from nli.loading import LoadedBase, load_base_model
from nli.manifest import AdapterManifest, write_manifest
from nli.prompt import CURRENT_PROMPT_FORMAT
from nli.scoring import label_tokens

REPO = Path(__file__).resolve().parents[2]


def make_adapter(
    base: LoadedBase,
    folder: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    scale: float = 4.0,
    base_model: str | None = None,
    fingerprint: str | None = None,
) -> Path:
    """Save a random LoRA adapter (``init_lora_weights=False``) with its NLI manifest.

    ``scale`` (lora_alpha / r) of 4 moves the tiny model's probabilities by ~0.05, far above
    batching noise (~1e-3 in bf16), so a wrong adapter is visible. ``base`` is left as it was
    (the LoRA layers are taken out again after saving).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank * scale,
        target_modules="all-linear",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base.model, config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(folder)
    base.model = peft_model.unload()
    ids = [list(seq) for seq in label_tokens(base.tokenizer).sequences]
    manifest = AdapterManifest(
        base_model=base_model or base.ref.name,
        base_model_fingerprint=fingerprint or base.ref.fingerprint,
        quantization=base.quantization,
        prompt_format=CURRENT_PROMPT_FORMAT,
        label_words=list(LABELS),
        label_token_ids=ids,
        training_data={"source": "random test adapter", "seed": seed},
    )
    write_manifest(folder, manifest)
    return folder


def make_adapters(base_dir: Path, root: Path, names: Mapping[str, int]) -> dict[str, Path]:
    """Create one adapter per ``{name: seed}`` under ``root`` on the tiny model at ``base_dir``."""
    base = load_base_model(str(base_dir), device="cpu")
    return {name: make_adapter(base, root / name, seed=seed) for name, seed in names.items()}


def make_settings(base_dir: Path, root: Path, **overrides: Any) -> Any:
    """Service settings for tests: the tiny model on CPU, everything under ``root``."""
    from app.settings import load_settings

    values: dict[str, Any] = {
        "base_model": str(base_dir),
        "device": "cpu",
        "adapters_dir": root / "adapters",
        "builtin_adapters_dir": root / "builtin",
        "data_dir": root / "data",
        "cache_dir": root / "cache",
    }
    values.update(overrides)
    return load_settings(**values)


def copy_adapter(source: Path, target: Path) -> Path:
    """Copy an adapter folder (e.g. into a test's own adapters dir)."""
    shutil.copytree(source, target)
    return target


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(base: Mapping[str, str] | None = None, **settings: Any) -> dict[str, str]:
    """The environment of a server subprocess: offline, plus ``NLI_<KEY>`` for each setting."""
    env = dict(os.environ if base is None else base)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key, value in settings.items():
        env[f"NLI_{key.upper()}"] = str(value)
    return env


def start_server(
    env: Mapping[str, str], *, port: int, log: Path, args: Iterable[str] = ()
) -> subprocess.Popen[bytes]:
    """Start ``nli-serve`` (as ``python -m app.cli``) on 127.0.0.1:port, logging to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(port), *args],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def wait_ready(
    url: str, *, process: subprocess.Popen[bytes] | None = None, timeout: float = 120.0
) -> None:
    """Poll ``GET /ready`` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop_server(process: subprocess.Popen[bytes], *, timeout: float = 30.0) -> int:
    """SIGTERM, then wait; kill if it does not exit in time. Returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def stream_request(
    client: Any, path: str, *, content_type: str, chunks: Iterable[bytes], method: str = "POST"
) -> tuple[int, int]:
    """Send a chunked body straight to the ASGI app of an entered ``TestClient``.

    (TestClient itself reads a whole body before calling the app.) Returns the status code and
    how many chunks the app pulled before it answered.
    """
    iterator = iter(chunks)
    pulled = 0
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        chunk = next(iterator, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", content_type.encode())],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }

    async def call() -> None:
        await client.app(scope, receive, send)

    client.portal.call(call)
    return status[0], pulled
