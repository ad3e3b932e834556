"""Settings: the NLI_* environment, defaults, and fail-fast validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.main import create_app
from app.settings import Settings, builtin_adapters_dir, load_settings
from nli.default_model import DEFAULT_BASE_MODEL
from nli.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("NLI_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.base_model == DEFAULT_BASE_MODEL
    assert settings.adapters_dir == Path("adapters")
    assert settings.builtin_adapters_dir == REPO / "adapters" == builtin_adapters_dir()
    assert settings.default_adapter is None
    assert (settings.device, settings.quantization) == ("auto", "nf4")
    assert settings.dequantize is False
    assert settings.max_pairs_per_request == 1024
    assert settings.eval_sync_max_rows == 1000
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.api_key is None


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = {
        "NLI_BASE_MODEL": "some/model",
        "NLI_ADAPTERS_DIR": str(tmp_path / "a"),
        "NLI_BUILTIN_ADAPTERS_DIR": str(tmp_path / "b"),
        "NLI_DEFAULT_ADAPTER": "snli.v2",
        "NLI_DEVICE": "cpu",
        "NLI_QUANTIZATION": "none",
        "NLI_MAX_BATCH_SIZE": "8",
        "NLI_MAX_BATCH_WAIT_MS": "0.5",
        "NLI_MAX_PAIRS_PER_REQUEST": "10",
        "NLI_MAX_TEXT_CHARS": "100",
        "NLI_MAX_UPLOAD_BYTES": "1000",
        "NLI_EVAL_SYNC_MAX_ROWS": "0",
        "NLI_MAX_QUEUE": "3",
        "NLI_API_KEY": "sekrit-value-42",
        "NLI_DATA_DIR": str(tmp_path / "d"),
        "NLI_CACHE_DIR": str(tmp_path / "c"),
        "NLI_HOST": "0.0.0.0",
        "NLI_PORT": "9000",
        "NLI_DEQUANTIZE": "true",
        "NLI_CUDA_GRAPHS": "false",
        "NLI_CUDA_GRAPH_WARMUP_TOKENS": "0",
        "NLI_CPU_MERGE": "false",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.base_model == "some/model"
    assert settings.adapters_dir == tmp_path / "a"
    assert settings.builtin_adapters_dir == tmp_path / "b"
    assert settings.default_adapter == "snli.v2"
    assert (settings.device, settings.quantization) == ("cpu", "none")
    assert settings.dequantize is True
    assert settings.cuda_graphs is False  # default True
    assert settings.cuda_graph_warmup_tokens == 0  # default 128
    assert settings.cpu_merge is False  # default True
    assert (settings.max_batch_size, settings.max_batch_wait_ms) == (8, 0.5)
    assert (settings.max_pairs_per_request, settings.max_text_chars) == (10, 100)
    assert (settings.max_upload_bytes, settings.eval_sync_max_rows) == (1000, 0)
    assert settings.max_queue == 3
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "sekrit-value-42"
    assert "sekrit" not in repr(settings)  # the key never shows in logs or reprs
    assert (settings.data_dir, settings.cache_dir) == (tmp_path / "d", tmp_path / "c")
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    # Arguments (the CLI's --host/--port) override the environment.
    assert load_settings(port=9001).port == 9001


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NLI_PORT", "0"),
        ("NLI_PORT", "eighty"),
        ("NLI_DEVICE", "tpu"),
        ("NLI_QUANTIZATION", "int3"),
        ("NLI_MAX_BATCH_SIZE", "0"),
        ("NLI_MAX_BATCH_WAIT_MS", "-1"),
        ("NLI_MAX_QUEUE", "0"),
        ("NLI_MAX_TEXT_CHARS", "0"),
        ("NLI_DEFAULT_ADAPTER", "../elsewhere"),
        ("NLI_BASE_MODEL", ""),
    ],
)
def test_bad_values_fail_fast_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()
    with pytest.raises(ConfigError, match=name):
        create_app()


def test_empty_api_key_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLI_API_KEY", "")
    assert load_settings().api_key is None


def test_settings_are_injected_and_overridable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_text_chars=5)
    application = create_app(settings)
    assert application.state.settings is settings
    schema = application.openapi()
    premise = schema["components"]["schemas"]["ClassifyRequest"]["properties"]["premise"]
    assert premise["maxLength"] == 5
