"""Adding a plain LoRA adapter next to loaded ones, in the state PEFT's ``load_adapter`` leaves.

PEFT 0.21's ``PeftModel.load_adapter`` walks every module of the model several times (matching
the target modules, snapshotting and marking trainable parameters, casting dtypes, selecting
adapters, re-keying the state dict, ``eval()``): most of a hot swap's time with 200+ LoRA layers.
When the new adapter is plain LoRA and every module it targets already holds a LoRA layer (a
service's adapters usually come from one recipe), the same end state is reached by calling each
layer's own ``update_layer`` (what PEFT calls for an existing LoRA layer) and copying the weights
in, with the module walks done once per model (``LoraIndex``).

``prepare`` (file reading and checks, no model access) returns None for anything it does not
fully understand, and ``attach`` returns False before changing anything when the adapter does not
fit the model exactly: the caller then loads it through PEFT, which also reports the errors.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nli.manifest import PEFT_CONFIG_FILE, WEIGHTS_FILE

# PEFT keys of a saved LoRA tensor: this prefix, the module's name, ".lora_A.weight" (or _B).
_KEY_PREFIX = "base_model.model."
# LoraConfig fields a plain adapter may set; every other field must keep LoraConfig's default.
_FREE_FIELDS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "init_lora_weights",
        "target_modules",
    }
)


@dataclass
class PreparedLora:
    """An adapter folder's config and weights (on the CPU), read and checked off the model."""

    config: Any  # peft.LoraConfig, inference_mode set
    tensors: dict[str, torch.Tensor]


@dataclass
class LoraIndex:
    """The LoRA layers of one PeftModel, and the modules PEFT would try to match a target with."""

    peft_model: Any
    layers: dict[str, Any]  # module name (in the tuner's model) -> its LoRA layer
    candidates: list[str]  # names of modules that are neither LoRA layers nor inside one


def is_plain_lora(config: Any) -> bool:
    """True for a LoraConfig whose loading is only ``update_layer`` on each target and a copy."""
    from peft import LoraConfig
    from peft.utils.constants import EMBEDDING_LAYER_NAMES, MIN_TARGET_MODULES_FOR_OPTIMIZATION

    if type(config) is not LoraConfig:
        return False
    # Initialisations that only pick starting weights (overwritten by the loaded ones); others
    # (PiSSA, OLoRA, LoftQ, ...) also change the base weights or need data.
    init = config.init_lora_weights
    if not (init is True or init is False or init == "gaussian"):
        return False
    targets = config.target_modules
    # A regex or "all-linear" needs PEFT's own resolution; 20+ names get rewritten by PEFT.
    if not isinstance(targets, (list, set)) or not targets:
        return False
    if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return False
    if not all(
        isinstance(t, str) and t.rsplit(".", 1)[-1] not in EMBEDDING_LAYER_NAMES for t in targets
    ):
        return False
    if not isinstance(config.r, int) or config.r <= 0:
        return False
    fields = config.to_dict()
    defaults = _default_fields()
    return fields.keys() == defaults.keys() and all(
        fields[key] == value for key, value in defaults.items() if key not in _FREE_FIELDS
    )


@functools.cache
def _default_fields() -> dict[str, Any]:
    from peft import LoraConfig

    return LoraConfig().to_dict()


def prepare(path: Path, *, weights: bytes | None = None) -> PreparedLora | None:
    """Read and check an adapter folder for ``attach``; None when PEFT should load it instead.

    Reads nothing of the model, so it may run while the model scores. None also for weights PEFT
    would refuse or the classifier's checks would (unreadable, not floating point, NaN/inf):
    loading those through PEFT raises the error the caller reports. ``weights``: the weights
    file's contents, already read by the caller (else the file is read).
    """
    from peft import LoraConfig
    from safetensors.torch import load, load_file

    try:
        raw = json.loads((path / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
            return None
        # As PeftModel.load_adapter reads it (it passes ephemeral_gpu_offload=False, too).
        config = LoraConfig.from_pretrained(str(path), ephemeral_gpu_offload=False)
        config.inference_mode = True
        if not is_plain_lora(config):
            return None
        if weights is None:
            tensors = load_file(str(path / WEIGHTS_FILE), device="cpu")
        else:
            tensors = load(weights)
    except Exception:  # noqa: BLE001 - whatever it is, PEFT's path reports it
        return None
    if not tensors or not all(t.is_floating_point() for t in tensors.values()):
        return None
    # One fused pass: a NaN or inf makes its tensor's norm NaN or inf. (A norm that overflows
    # for finite weights only sends the adapter down PEFT's path, whose check is exact.)
    norms = torch._foreach_norm(list(tensors.values()))
    if not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return None
    return PreparedLora(config, tensors)


def build_index(peft_model: Any) -> LoraIndex | None:
    """One walk over the model; None when it holds anything but plain LoRA layers."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers: dict[str, Any] = {}
    candidates: list[str] = []
    inside: str | None = None  # "name." of the tuner layer being walked (depth-first)
    for key, module in peft_model.base_model.model.named_modules():
        if inside is not None and key.startswith(inside):
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                return None  # nested tuner layers (e.g. ParamWrapper): PEFT's business
            continue
        inside = None
        if isinstance(module, AuxiliaryTrainingWrapper):
            return None  # modules_to_save or trainable tokens of an earlier adapter
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, LoraLayer) or (
                getattr(type(module), "update_layer", None) is not LoraLayer.update_layer
            ):
                return None  # not the plain Linear LoRA layer (embedding, conv, AdaLoRA, ...)
            layers[key] = module
            inside = key + "."
        elif key:
            candidates.append(key)
    if not layers:
        return None
    return LoraIndex(peft_model, layers, candidates)


def attach(index: LoraIndex, prepared: PreparedLora, name: str) -> bool:
    """Add ``prepared`` as adapter ``name``; False, with nothing changed, where it does not fit.

    On an exception after the first change, ``name`` is in ``peft_config`` and may be in some
    layers: the caller deletes it as it deletes an adapter PEFT half-loaded.
    """
    from peft.tuners.tuners_utils import _ExcludedModule, _extend_unique
    from peft.utils.transformers_weight_conversion import get_checkpoint_conversion_mapping

    peft_model = index.peft_model
    tuner = peft_model.base_model
    config = prepared.config
    if name in peft_model.peft_config or getattr(tuner, "targeted_parameter_names", None):
        return False
    if not all(is_plain_lora(other) for other in peft_model.peft_config.values()):
        return False
    model = tuner.model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or get_checkpoint_conversion_mapping(model_type) is not None:
        return False  # transformers v5 rewrites this architecture's adapter configs and keys

    # The modules PEFT would target: all must already be LoRA layers.
    def targeted(key: str) -> bool:
        found = tuner._check_target_module_exists(config, key)
        return bool(found) and not isinstance(found, _ExcludedModule)

    if any(targeted(key) for key in index.candidates):
        return False
    targets = [(key, layer) for key, layer in index.layers.items() if targeted(key)]
    if not targets:
        return False
    # Exactly the tensors get_peft_model_state_dict would name, in the shapes update_layer makes.
    expected: dict[str, tuple[Any, str, tuple[int, int]]] = {}
    for key, layer in targets:
        if layer.merged or getattr(layer.get_base_layer(), "_hf_tp_plan", None) is not None:
            return False
        stem = f"{_KEY_PREFIX}{key}"
        expected[f"{stem}.lora_A.weight"] = (layer, "lora_A", (config.r, layer.in_features))
        expected[f"{stem}.lora_B.weight"] = (layer, "lora_B", (layer.out_features, config.r))
    tensors = prepared.tensors
    if tensors.keys() != expected.keys():
        return False
    if any(tuple(tensors[k].shape) != shape for k, (_, _, shape) in expected.items()):
        return False

    # PeftModel.add_adapter registers the config first; inject_adapter checks it against the rest.
    peft_model.peft_config[name] = config
    tuner._check_new_adapter_config(config)
    # _create_and_replace's call for a module that already is a LoRA layer, with the new LoRA
    # modules made on the meta device: their random initialisation, move to the base layer's
    # device and float32 cast would all be overwritten by the weights below. update_layer only
    # reads its config: a copy without LoRA's own initialisation (a trained adapter's
    # init_lora_weights is True) skips that work too; is_plain_lora allows no initialisation
    # that does more than pick starting weights.
    layer_config = copy.copy(config)
    layer_config.init_lora_weights = False
    with torch.device("meta"):
        for key, layer in targets:
            tuner._check_target_module_compatiblity(config, model, key.rsplit(".", 1)[-1])
            layer.update_layer(
                name, config.r, lora_alpha=config.lora_alpha, target_name=key, config=layer_config
            )
    _extend_unique(tuner.targeted_module_names, [key for key, _ in targets])
    # The weights, in the device and dtype PEFT's path ends with (the base layer's device;
    # float32 after add_adapter's autocast), sent over in one copy per device.
    placed = _place(
        {key: (tensors[key], *_destination(layer)) for key, (layer, _, _) in expected.items()}
    )
    for key, (layer, attr, _) in expected.items():
        getattr(layer, attr)[name].weight = torch.nn.Parameter(placed[key], requires_grad=False)
    # inject_adapter's housekeeping: re-select the active adapters frozen (inference_mode) on
    # every layer; its trainability snapshot/restore and _mark_only_adapters_as_trainable leave
    # every other parameter as it was for plain LoRA.
    active = tuner.active_adapters
    for layer in index.layers.values():
        layer.set_adapter(active, inference_mode=True)
    tuner.active_adapter = active
    for _, layer in targets:
        # load_adapter ends with eval(); the model was in eval mode, only the new modules are not.
        for attr in ("lora_A", "lora_B", "lora_dropout"):
            getattr(layer, attr)[name].eval()
    return True


def _destination(layer: Any) -> tuple[torch.device, torch.dtype]:
    """Where PEFT's load leaves a LoRA weight of ``layer``: the base layer's device (the CPU
    when it has none), in the base layer's float dtype (``compute_dtype`` for 4-bit layers) or
    float32, upcast to float32 when narrower (``cast_adapter_dtype``)."""
    device, dtype = layer._get_base_layer_device_and_dtype(layer.get_base_layer())
    if dtype is None or not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    if dtype.itemsize < 4:
        dtype = torch.float32
    return torch.device("cpu") if device is None else device, dtype


def _place(
    items: dict[str, tuple[torch.Tensor, torch.device, torch.dtype]],
) -> dict[str, torch.Tensor]:
    """Each tensor converted to its dtype and moved to its device, one copy per (device, dtype):
    a few hundred small host-to-device copies cost more than one large one."""
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key, (_, device, dtype) in items.items():
        groups.setdefault((device, dtype), []).append(key)
    placed: dict[str, torch.Tensor] = {}
    for (device, dtype), keys in groups.items():
        sources = [items[key][0] for key in keys]
        flat = torch.cat([t.reshape(-1).to(dtype) for t in sources]).to(device)
        parts = flat.split([t.numel() for t in sources])
        for key, source, part in zip(keys, sources, parts, strict=True):
            placed[key] = part.view(source.shape)
    return placed
