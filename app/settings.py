"""Service settings: environment variables with the ``NLI_`` prefix, validated at start-up."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nli.default_model import DEFAULT_BASE_MODEL
from nli.errors import ConfigError

# Adapter names: a path component of the adapters dir that can never be "." or ".." nor hidden.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
ADAPTER_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
# "base" always means the bare base model; no adapter may take that name.
BASE = "base"
# The adapter shipped with the project for the offline default base model.
BUILTIN_DEFAULT_ADAPTER = "snli-smollm2"


def builtin_adapters_dir() -> Path:
    """The repository's ``adapters/`` folder, found relative to the installed package."""
    return Path(__file__).resolve().parents[1] / "adapters"


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/nli-qlora`` or ``~/.local/share/nli-qlora``."""
    root = os.environ.get("XDG_DATA_HOME")
    return (Path(root) if root else Path.home() / ".local" / "share") / "nli-qlora"


class Settings(BaseSettings):
    """Everything the service reads from its environment (``NLI_*``)."""

    model_config = SettingsConfigDict(env_prefix="NLI_", extra="ignore", frozen=True)

    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        min_length=1,
        description="Base model: the offline default alias, a local folder or a hub id.",
    )
    adapters_dir: Path = Field(Path("adapters"), description="Where POST /adapters looks first.")
    builtin_adapters_dir: Path = Field(
        default_factory=builtin_adapters_dir,
        description="Adapters shipped with the project, looked up after adapters_dir.",
    )
    default_adapter: str | None = Field(
        None,
        description=(
            "Adapter loaded and used when a request names none, or 'base'. Unset: the shipped "
            f"'{BUILTIN_DEFAULT_ADAPTER}' when the base is the offline default, else 'base'."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: Literal["nf4", "none"] = "nf4"
    dequantize: bool = Field(
        False,
        description=(
            "Hold the NF4 weights expanded in the compute dtype: the same quantized values, "
            "about 4x the base's memory, less work per request (small bases, batch-1 latency); "
            "on CUDA the graphs then read adapters merged into a copy of the weights."
        ),
    )
    cuda_graphs: bool = Field(
        True,
        description=(
            "On CUDA, replay a recorded CUDA graph for batches of up to 64 rows that share one "
            "adapter (nli.cuda_graphs): one launch instead of ~1,500; adapter swaps keep them."
        ),
    )
    cpu_merge: bool = Field(
        True,
        description=(
            "On a CPU with a floating-point base (NLI_DEQUANTIZE=1, or no quantization), an "
            "adapter that has been the only one of 8 batches in a row is merged into a copy of "
            "the linear weights, and its requests skip PEFT's LoRA layers (nli.cpu_merge)."
        ),
    )
    cuda_graph_warmup_tokens: int = Field(
        128,
        ge=0,
        le=4096,
        description=(
            "Once ready, record the CUDA graph of every batch size for prompts of up to this "
            "many tokens (SNLI prompts: ~75), so no request waits for a recording; 0: record "
            "each on first use only."
        ),
    )
    max_batch_size: int = Field(64, ge=1, le=4096, description="Rows per forward pass.")
    max_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description=(
            "How long a batch may wait for more requests under load. 0: take what is queued "
            "(requests queue up during each forward anyway; 2 ms cost 64 clients 10-15% of "
            "their requests/s on an H100, BENCHMARKS.md)."
        ),
    )
    gc_freeze: bool = Field(
        True,
        description=(
            "Once ready, exempt the objects built at start-up (model, tokenizer, web stack) "
            "from garbage collection: a full collection then skips them instead of pausing "
            "every request for 200+ ms (nli.gc_freeze)."
        ),
    )
    max_pairs_per_request: int = Field(1024, ge=1, le=100_000)
    max_text_chars: int = Field(2000, ge=1, le=1_000_000, description="Per premise/hypothesis.")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="POST /evaluate file size.")
    eval_sync_max_rows: int = Field(1000, ge=0, description="Larger evaluations become jobs.")
    max_queue: int = Field(1024, ge=1, description="Classify requests waiting; then 503.")
    api_key: SecretStr | None = Field(None, description="Bearer key of the admin routes.")
    data_dir: Path = Field(default_factory=default_data_dir, description="Jobs DB and uploads.")
    cache_dir: Path | None = Field(None, description="Converted default model (nli cache).")
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("default_adapter")
    @classmethod
    def _check_default_adapter(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if value != BASE and not ADAPTER_NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not 'base' nor a valid adapter name")
        return value

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None  # an empty variable means "no key", not "the empty key"
        return value

    @property
    def max_json_body_bytes(self) -> int:
        """The largest JSON body a valid request can have (6 bytes per char for \\u escapes)."""
        return self.max_pairs_per_request * (2 * self.max_text_chars * 6 + 64) + 64 * 1024

    @property
    def max_upload_body_bytes(self) -> int:
        """The upload limit plus room for the multipart envelope and the small form fields."""
        return self.max_upload_bytes + 64 * 1024


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment (and ``overrides``); ``ConfigError`` on bad values."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"NLI_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
