"""Base model resolution and 4-bit loading: the one module that knows about bitsandbytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from nli.default_model import DEFAULT_BASE_MODEL, SOURCE_MARKER, ensure_default_model
from nli.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

Quantization = Literal["nf4", "none"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
QUANTIZATIONS: tuple[Quantization, ...] = ("nf4", "none")


@dataclass(frozen=True)
class BaseModelRef:
    """Identity of a base model: the name users give, plus a fingerprint of its contents."""

    name: str
    fingerprint: str


@dataclass
class LoadedBase:
    """A loaded base model with its tokenizer and identity."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    ref: BaseModelRef
    quantization: Quantization
    device: torch.device
    for_training: bool
    dequantized: bool = False
    """NF4 weights held expanded in the compute dtype (``dequantize_4bit_linears``)."""


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU; ``cuda:N`` picks one GPU (one per DDP rank)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = choice.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"unknown device {choice!r} (expected auto, cpu, cuda or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {choice!r} was asked for, but no CUDA device is available")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {choice!r} was asked for, but only {torch.cuda.device_count()} GPU(s) exist"
        )
    return torch.device(choice)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it, else fp32 (fp16 overflows in some layers)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16


def resolve_base_model(name: str) -> tuple[str, BaseModelRef]:
    """Map a base model name to what ``from_pretrained`` takes, and its identity.

    ``name`` is the offline default alias, a local folder, or a Hugging Face hub id.
    """
    if name == DEFAULT_BASE_MODEL:
        folder = ensure_default_model()
        source = json.loads((folder / SOURCE_MARKER).read_text())
        return str(folder), BaseModelRef(name, f"gguf-sha256:{source['gguf_sha256']}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder (no config.json)")
        return str(path), BaseModelRef(name, _folder_fingerprint(path))
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"base model {name!r} is not a model folder")
    return name, BaseModelRef(name, _hub_fingerprint(name))


def _folder_fingerprint(path: Path) -> str:
    # Hashing gigabytes of weights at every start is too slow; the config plus the names and
    # sizes of the weight files identify a checkpoint well enough to catch a wrong base.
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"folder-sha256:{digest.hexdigest()[:16]}"


def _hub_fingerprint(name: str) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:  # network, auth, missing repo: all mean "cannot load"
        raise ModelLoadError(f"cannot resolve base model {name!r}: {exc}") from exc
    revision = getattr(config, "_commit_hash", None)
    return f"hub-revision:{revision}" if revision else "hub-revision:unknown"


def load_tokenizer(source: str) -> Any:
    """Load a tokenizer and make it ready for right-padded batches."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(
    name: str = DEFAULT_BASE_MODEL,
    *,
    quantization: Quantization = "nf4",
    device: str = "auto",
    for_training: bool = False,
    dequantize: bool = False,
) -> LoadedBase:
    """Load a base model (NF4 with double quantization by default) and its tokenizer.

    ``for_training`` applies the CPU AVX512-BF16 workaround (see
    ``disable_cpu_inference_fast_path``); serving leaves it off because it costs speed.
    ``dequantize`` (NF4 only) then holds the quantized weights expanded in the compute dtype:
    the same NF4 values, 2 bytes a weight instead of ~0.5, no dequantize work per forward.
    Training does this itself, after its k-bit preparation (``model.dequantize_frozen``).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r} (expected nf4 or none)")
    target = resolve_device(device)
    source, ref = resolve_base_model(name)
    dtype = compute_dtype(target)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": target}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    logger.info("loading base model %s (%s) on %s", name, quantization, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load base model {name!r}: {exc}") from exc
    model.eval()
    if target.type == "cuda":
        avoid_cudnn_attention()
    if for_training:
        disable_cpu_inference_fast_path(model)
    dequantized = dequantize and quantization == "nf4"
    if dequantized:
        count = dequantize_4bit_linears(model)
        logger.info("holding %d NF4 layers dequantized", count)
    return LoadedBase(model, tokenizer, ref, quantization, target, for_training, dequantized)


class DequantizedLinear(torch.nn.Linear):
    """A frozen ``nn.Linear`` computing like bitsandbytes' ``Linear4bit``: the input is cast to
    the weight's (compute) dtype and the output back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def dequantize_4bit_linears(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes ``Linear4bit`` by a frozen ``nn.Linear`` holding exactly the
    weights the 4-bit layer computes with (``dequantize_4bit`` in its compute dtype); return the
    count. Module names are unchanged, so LoRA attaches, saves and loads as on the 4-bit base.
    """
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Linear4bit):
                continue
            dtype = child.compute_dtype or torch.float32
            packed: Any = child.weight
            weight = dequantize_4bit(packed.data, packed.quant_state).to(dtype)
            linear = DequantizedLinear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device=weight.device,
                dtype=dtype,
            )
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                linear.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, linear)
            replaced += 1
    return replaced


def avoid_cudnn_attention() -> None:
    """Take cuDNN out of the kernels PyTorch's scaled-dot-product attention may pick (the flash
    and memory-efficient kernels remain). Process-wide.

    Measured on an H200 with torch 2.11 (BENCHMARKS.md): cuDNN attention spent 1.2-1.8 ms of CPU
    per call, forward and backward, against 0.03-0.26 ms of GPU work, because every new sequence
    length builds a new execution plan and NLI batches come in many lengths. For a 30-layer model
    that was 60-80 ms of every training step.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def disable_cpu_inference_fast_path(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every ``Linear4bit``; return the count.

    Works around bitsandbytes 0.50 on CPUs with AVX512-BF16: the first eval-mode forward without
    grad repacks 4-bit weights into an inference layout, after which training crashes on layers
    with a bias ("a view of a leaf Variable ... in-place operation") or silently yields zero LoRA
    gradients on layers without one. Costs inference speed, so only for training.
    """
    from bitsandbytes.nn import Linear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


@contextlib.contextmanager
def keep_cpu_packed_weights(model: torch.nn.Module) -> Iterator[None]:
    """Keep bitsandbytes' CPU inference layout intact through code that calls ``state_dict()``.

    Works around bitsandbytes 0.50 on CPUs with AVX512-BF16: ``Linear4bit._save_to_state_dict``
    converts repacked weights back with a lossy re-quantization of the double-quantized absmax
    (``_convert_weight_packed_for_cpu_inverse``), and the next forward repacks them. PEFT's
    ``load_adapter`` calls ``state_dict()``, so loading an adapter into a model that had already
    run shifted every later score (up to ~5e-3 in probability) and broke "swap back == before".
    The packed tensors and quant state are restored as they were. A no-op without bitsandbytes.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # e.g. an unquantized model on a machine without bitsandbytes
        yield
        return

    saved = []
    for module in model.modules():
        if isinstance(module, Linear4bit):
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                saved.append((module.weight, module.weight.data, state, dict(vars(state))))
    try:
        yield
    finally:
        for weight, data, state, fields in saved:
            if not getattr(state, "packing_format_for_cpu", False):
                weight.data = data
                vars(state).clear()
                vars(state).update(fields)
            weight.quant_state = state  # type: ignore[attr-defined]


def is_4bit(model: torch.nn.Module) -> bool:
    """True when the model holds bitsandbytes 4-bit layers."""
    from bitsandbytes.nn import Linear4bit

    return any(isinstance(m, Linear4bit) for m in model.modules())


def free_device_memory(device: torch.device) -> None:
    """Return cached allocator blocks to the driver after freeing tensors."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
