"""Label scoring: one forward pass, the three label rows of the output layer, softmax over three.

``label_logits`` is the single definition of a prediction. Serving turns its output into
probabilities; training feeds it to cross-entropy. Only when the label words' first tokens
collide does it fall back to scoring each label's whole continuation.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nli.errors import ConfigError
from nli.prompt import label_texts

logger = logging.getLogger(__name__)

# PEFT's per-row adapter name for "no adapter" in a mixed batch.
PEFT_BASE_ROW = "__base__"


@dataclass(frozen=True)
class LabelTokens:
    """Token ids of the three label words as they follow the prompt."""

    sequences: tuple[tuple[int, ...], ...]

    @property
    def first_ids(self) -> list[int]:
        return [seq[0] for seq in self.sequences]

    @property
    def distinct(self) -> bool:
        """True when one next-token distribution separates the labels."""
        return len(set(self.first_ids)) == len(self.sequences)


def label_tokens(tokenizer: Any) -> LabelTokens:
    """Tokenise the label words; warn when their first tokens collide (slower fallback)."""
    sequences = tuple(
        tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        for text in label_texts(tokenizer)
    )
    if any(not seq for seq in sequences) or len(set(sequences)) != len(sequences):
        raise ConfigError(f"the tokenizer cannot tell the label words apart: {sequences}")
    tokens = LabelTokens(sequences)
    if not tokens.distinct:
        logger.warning(
            "label words share first tokens %s: scoring whole continuations instead",
            tokens.first_ids,
        )
    return tokens


@dataclass
class EncodedBatch:
    """Right-padded token ids; ``last_index`` is each row's answer position."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device | str = "cpu",
    pad_to_multiple_of: int = 1,
) -> EncodedBatch:
    """Right-pad sequences into one batch (right padding keeps every row's positions intact).

    Padding is one vectorised numpy scatter rather than a per-row loop. On CUDA the ids travel
    from pinned memory without blocking, and the mask and answer positions are derived on the
    device, so building the next batch overlaps the current forward. ``pad_to_multiple_of``
    rounds the padded length up (compiled code specialises on a length's alignment).
    """
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    flat = np.array(list(itertools.chain.from_iterable(sequences)), dtype=np.int64)
    longest = -(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of
    filled = np.arange(longest) < lengths[:, None]
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    ids[filled] = flat  # row-major order: each row's tokens, then its padding
    target = torch.device(device)
    ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
    if target.type == "cuda":
        ids_t = ids_t.pin_memory().to(target, non_blocking=True)
        lengths_t = lengths_t.pin_memory().to(target, non_blocking=True)
        positions = torch.arange(longest, device=target)
        mask = (positions < lengths_t[:, None]).long()
        return EncodedBatch(ids_t, mask, lengths_t - 1)
    mask = torch.from_numpy(filled.astype(np.int64))
    return EncodedBatch(ids_t.to(target), mask.to(target), (lengths_t - 1).to(target))


def plan_batches(
    lengths: Sequence[int], *, max_batch_size: int, max_tokens: int
) -> list[list[int]]:
    """Group indices into batches by length (limits padding), bounded in rows and padded tokens."""
    if max_batch_size < 1 or max_tokens < 1:
        raise ConfigError("max_batch_size and max_tokens must be positive")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        grown = max(longest, lengths[index])
        if current and (len(current) >= max_batch_size or grown * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, grown = [], lengths[index]
        current.append(index)
        longest = grown
    if current:
        batches.append(current)
    return batches


def split_peft(model: Any) -> tuple[Any, Any | None]:
    """Return (the transformers causal LM, the PeftModel wrapping it or None)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model, None
    if isinstance(model, PeftModel):
        return model.get_base_model(), model
    return model, None


@contextlib.contextmanager
def _adapter_rows(peft_model: Any | None, adapter_names: list[str] | None) -> Iterator[None]:
    # PEFT's per-row adapter selection (the public `adapter_names=` of PeftModel.forward) is
    # implemented by this context manager; entering it directly lets us run the decoder alone
    # and skip the full-vocabulary output layer.
    if peft_model is None or adapter_names is None:
        yield
        return
    with peft_model._enable_peft_forward_hooks(adapter_names=adapter_names):
        yield


def decoder_hidden_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    adapter_names: list[str] | None = None,
    decoder_forward: Callable[..., Any] | None = None,
    **decoder_kwargs: Any,
) -> tuple[Any, torch.Tensor]:
    """Run only the decoder (no output layer): ``(the causal LM, last hidden states)``.

    ``adapter_names`` selects a PEFT adapter per row; ``decoder_forward`` replaces the decoder's
    own forward (a compiled one); ``decoder_kwargs`` go to the decoder (e.g. a prefix cache).
    """
    causal_lm, peft_model = split_peft(model)
    if adapter_names is not None and peft_model is None:
        if any(name != PEFT_BASE_ROW for name in adapter_names):
            raise ConfigError("adapter rows were given, but no adapter is loaded")
        adapter_names = None
    decoder = causal_lm.get_decoder()
    forward = decoder if decoder_forward is None else decoder_forward
    decoder_kwargs.setdefault("use_cache", False)
    with _adapter_rows(peft_model, adapter_names):
        out = forward(input_ids=input_ids, attention_mask=attention_mask, **decoder_kwargs)
    return causal_lm, out.last_hidden_state


def _hidden_states(
    model: Any,
    batch: EncodedBatch,
    adapter_names: list[str] | None,
    decoder_forward: Callable[..., Any] | None = None,
) -> tuple[Any, torch.Tensor]:
    return decoder_hidden_states(
        model,
        batch.input_ids,
        batch.attention_mask,
        adapter_names=adapter_names,
        decoder_forward=decoder_forward,
    )


@functools.cache
def _label_index(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Built once per device: a fresh host->device copy per batch would wait for the GPU to drain.
    # Never evicted: recorded CUDA graphs (nli.cuda_graphs) read it at its address.
    # inference_mode(False): a tensor made under inference mode could not be reused by training.
    with torch.inference_mode(False):
        return torch.tensor(ids, dtype=torch.long, device=device)


def project_labels(causal_lm: Any, answer: torch.Tensor, tokens: LabelTokens) -> torch.Tensor:
    """Float32 logits ``[rows, 3]`` from answer-position hidden states: three output-layer rows."""
    head = causal_lm.get_output_embeddings()
    ids = _label_index(tuple(tokens.first_ids), answer.device)
    weight = head.weight[ids]
    logits = answer.to(weight.dtype) @ weight.T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids]
    return logits.float()


def label_logits(
    model: Any,
    batch: EncodedBatch,
    tokens: LabelTokens,
    *,
    adapter_names: list[str] | None = None,
    decoder_forward: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """Float32 logits ``[batch, 3]`` of the three labels at each row's answer position.

    ``adapter_names`` selects a PEFT adapter per row (``"__base__"`` = none); ``None`` runs the
    model as it is (its active adapter, or none). Softmax of the result gives the probabilities;
    cross-entropy on it is the training loss. ``decoder_forward`` (inference only) replaces the
    decoder's forward, e.g. by a ``torch.compile``d one.
    """
    if not tokens.distinct:
        return _continuation_logits(model, batch, tokens, adapter_names)
    causal_lm, hidden = _hidden_states(model, batch, adapter_names, decoder_forward)
    rows = torch.arange(len(batch), device=hidden.device)
    return project_labels(causal_lm, hidden[rows, batch.last_index], tokens)


def _continuation_logits(
    model: Any, batch: EncodedBatch, tokens: LabelTokens, adapter_names: list[str] | None
) -> torch.Tensor:
    """Summed log-probabilities of each label's whole token sequence (collision fallback)."""
    prompts = [
        batch.input_ids[row, : int(batch.last_index[row]) + 1].tolist() for row in range(len(batch))
    ]
    expanded = [prompt + list(seq[:-1]) for prompt in prompts for seq in tokens.sequences]
    # Right padding is masked and lies after every position read, so its id does not matter.
    big = collate(expanded, pad_id=0, device=batch.input_ids.device)
    rows_names = None
    if adapter_names is not None:
        rows_names = [name for name in adapter_names for _ in tokens.sequences]
    causal_lm, hidden = _hidden_states(model, big, rows_names)
    head = causal_lm.get_output_embeddings()
    scores = torch.zeros(len(expanded), device=hidden.device)
    for row in range(len(expanded)):
        label_seq = tokens.sequences[row % len(tokens.sequences)]
        start = len(prompts[row // len(tokens.sequences)]) - 1
        positions = hidden[row, start : start + len(label_seq)]
        log_probs = torch.log_softmax(head(positions).float(), dim=-1)
        targets = torch.as_tensor(label_seq, device=hidden.device)
        scores[row] = log_probs.gather(1, targets[:, None]).sum()
    return scores.view(len(batch), len(tokens.sequences))
