"""The model being trained: the 4-bit base, k-bit preparation, LoRA, and a label-logits forward."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training

from nli.layer_compile import use_compile_settings
from nli.loading import LoadedBase, dequantize_4bit_linears, is_4bit, load_base_model
from nli.scoring import EncodedBatch, LabelTokens, label_logits, label_tokens, split_peft
from training.config import LoraSettings, ModelConfig

logger = logging.getLogger(__name__)


class LabelScoringModel(PeftModel):
    """A ``PeftModel`` whose forward returns the ``[batch, 3]`` label logits of ``nli.scoring``.

    The loss has to be computed inside ``forward``: under DDP only work that runs through the
    wrapped module's forward has its gradients synchronised across ranks. Being a ``PeftModel``
    keeps Trainer's adapter handling (checkpoints hold only adapter files; resume and best-model
    loading use ``load_adapter``), and the saved folder is an ordinary PEFT LoRA adapter.
    """

    label_tokens: LabelTokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        last_index: torch.Tensor,
        **_unused: Any,
    ) -> torch.Tensor:
        """Label logits at each row's answer position (the serving computation). The mask is the
        ``[rows, length]`` padding mask, or a 4-D one that goes to the attention as it is
        (``training.step_graphs.causal_mask``)."""
        batch = EncodedBatch(input_ids, attention_mask, last_index)
        return label_logits(self, batch, self.label_tokens)


def lora_config(settings: LoraSettings) -> LoraConfig:
    """peft's ``LoraConfig`` for the settings."""
    targets: str | list[str] = settings.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        # peft reads a lone string as a regex over full module paths, which a bare module name
        # ("q_proj") never matches: treat it as a one-name list instead.
        targets = [targets]
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_base(model: Any, settings: ModelConfig) -> Any:
    """k-bit preparation and (optional) gradient checkpointing of a freshly loaded base."""
    # Non-reentrant checkpointing needs no inputs that require grad (no embedding hook).
    checkpoint_kwargs = {"use_reentrant": False}
    quantized = is_4bit(model)
    if settings.prepare_kbit and quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpoint_kwargs,
        )
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    if settings.dequantize_frozen and quantized:
        # After the k-bit preparation, which casts every non-4-bit weight to float32: the
        # dequantized layers stay in the compute dtype the 4-bit layers used.
        count = dequantize_4bit_linears(model)
        logger.info("holding %d frozen NF4 layers dequantized for training", count)
    model.config.use_cache = False
    return model


def build_training_model(
    model_cfg: ModelConfig, lora: LoraSettings, *, device: str
) -> tuple[LoadedBase, LabelScoringModel]:
    """Load the base for training (CPU AVX512-BF16 workaround on), prepare it, add LoRA."""
    base = load_base_model(
        model_cfg.base_model,
        quantization=model_cfg.quantization,
        device=device,
        for_training=True,
    )
    tokens = label_tokens(base.tokenizer)
    prepared = prepare_base(base.model, model_cfg)
    peft_model = LabelScoringModel(prepared, lora_config(lora))
    peft_model.label_tokens = tokens
    # The folder path of a converted or cached model means nothing elsewhere; the manifest
    # carries the real identity, this field is informational.
    peft_model.peft_config["default"].base_model_name_or_path = base.ref.name
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d on %s: %s trainable of %s parameters (%.3f%%)",
        lora.r,
        lora.target_modules,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return base, peft_model


def skip_lora_input_casts(model: torch.nn.Module) -> int:
    """Stop peft from casting every LoRA layer's input to the adapter's float32 dtype; return
    the number of layers changed.

    Only for bf16 autocast, which casts the input of each LoRA matmul to bf16 anyway: peft's
    cast would copy the activation to float32 for autocast to copy it straight back, two
    activation-sized copies per layer, forward and backward, that change no result.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # type: ignore[assignment]
            count += 1
    return count


COMPILED_PADDING = 8
"""Batches pad to a multiple of this under ``train.torch_compile`` or ``train.cuda_graphs``
(``training.train.pads_lengths``, ``LabelCollator``)."""


def _require_grad_when_training(module: Any, inputs: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def compile_decoder_layers(
    model: torch.nn.Module, *, backend: str | Callable[..., Any] = "inductor"
) -> int:
    """``torch.compile`` each decoder layer, with dynamic shapes; return how many.

    The layers run the same code on weights of the same shapes, and compiled code is kept per
    code object and guarded on what the layer holds, not on which layer it is, so the layers
    share the compiled code: each compile traces one layer, not the whole model.
    Dynamic shapes keep length-grouped batches from recompiling per length, which made
    compiling the whole model (Trainer's ``torch_compile``) unusable here. Graphs still differ
    by grad mode (training, evaluation), by whether the batch has padding (no mask without it)
    and by a length's alignment (so ``LabelCollator`` pads to a multiple of
    ``COMPILED_PADDING``), and by whether the layer's input requires grad (so the embeddings'
    output requires grad in training, as every later layer's input does). The module tree and
    state dict are unchanged.
    """
    causal_lm = split_peft(model)[0]
    # The first layer's input would not require grad and the others' would: two graphs.
    causal_lm.get_input_embeddings().register_forward_hook(_require_grad_when_training)
    decoder = causal_lm.get_decoder()
    for layer in decoder.layers:
        layer.compile(dynamic=True, backend=backend)
    # Trainer makes the first call, out of reach of a context manager: no shared symbols for
    # equal sizes (batch 128, 128 tokens), floats as constants (nli.layer_compile._SETTINGS).
    use_compile_settings()
    logger.info(
        "compiling the %d decoder layers (one shared graph); the first step waits",
        len(decoder.layers),
    )
    return len(decoder.layers)


def parameter_counts(model: PeftModel) -> dict[str, Any]:
    """Trainable and total parameters as peft counts them (4-bit weights unpacked)."""
    trainable, total = model.get_nb_trainable_parameters()
    return {
        "total": int(total),
        "trainable": int(trainable),
        "trainable_percent": 100.0 * trainable / total,
    }


def lora_summary(model: PeftModel, settings: LoraSettings) -> dict[str, Any]:
    """What the manifest records about the adapter."""
    targets = getattr(model.peft_config["default"], "target_modules", None)
    if isinstance(targets, set | list):
        # peft may record one full path per layer; the module names say the same, shorter.
        targets = sorted({name.rsplit(".", 1)[-1] for name in targets})
    return {
        "r": settings.r,
        "alpha": settings.alpha,
        "dropout": settings.dropout,
        "target_modules": targets,
        "requested_target_modules": settings.target_modules,
    }
