"""The prompt format: how a (premise, hypothesis) pair becomes token ids, for training and serving.

One function encodes pairs everywhere. Formats are versioned; an adapter's manifest records the
version it was trained with, and serving encodes its pairs with that same version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nli.errors import ConfigError, InputTooLongError
from nli.labels import LABELS

_PREMISE = "\x00PREMISE\x00"
_HYPOTHESIS = "\x00HYPOTHESIS\x00"


@dataclass(frozen=True)
class PromptFormat:
    """A versioned prompt: a short system line and a user message with two slots."""

    version: int
    system: str
    user: str  # must contain {premise} and {hypothesis}, premise first
    plain_answer_prefix: str = "\nAnswer:"  # used when the tokenizer has no chat template


PROMPT_FORMATS: dict[int, PromptFormat] = {
    1: PromptFormat(
        version=1,
        # A one-line system message also keeps chat templates (SmolLM2's) from inserting their
        # ~30-token default system prompt: on CPU every token costs latency.
        system="Answer entailment, neutral or contradiction.",
        user="Premise: {premise}\nHypothesis: {hypothesis}",
    ),
}
CURRENT_PROMPT_FORMAT = 1


def get_prompt_format(version: int = CURRENT_PROMPT_FORMAT) -> PromptFormat:
    """Look up a prompt format by version."""
    try:
        return PROMPT_FORMATS[version]
    except KeyError:
        known = ", ".join(str(v) for v in PROMPT_FORMATS)
        raise ConfigError(f"unknown prompt format version {version} (known: {known})") from None


def uses_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template (then the answer follows its turn start)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, premise: str, hypothesis: str, fmt: PromptFormat) -> str:
    """The full prompt text, ending where the answer's first token goes."""
    user = fmt.user.format(premise=premise, hypothesis=hypothesis)
    if uses_chat_template(tokenizer):
        messages = [{"role": "system", "content": fmt.system}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    return f"{fmt.system}\n{user}{fmt.plain_answer_prefix}"


def label_texts(tokenizer: Any) -> list[str]:
    """The label words as they follow the prompt (a leading space after a plain "Answer:")."""
    prefix = "" if uses_chat_template(tokenizer) else " "
    return [prefix + label for label in LABELS]


class PairEncoder:
    """Encodes pairs to token ids with one prompt format and a token budget.

    The template is rendered once with placeholders and split into three fixed pieces, so each
    pair costs only the tokenisation of its two texts. Over-long pairs lose the end of the
    premise first; the template and the hypothesis are never cut.
    """

    def __init__(self, tokenizer: Any, fmt: PromptFormat, *, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.format = fmt
        self.max_length = max_length
        text = render_prompt(tokenizer, _PREMISE, _HYPOTHESIS, fmt)
        if text.count(_PREMISE) != 1 or text.count(_HYPOTHESIS) != 1:
            raise ConfigError("the prompt template must hold each slot exactly once")
        before, rest = text.split(_PREMISE)
        middle, after = rest.split(_HYPOTHESIS)
        # A space before a slot belongs to the slot's first word, as in natural BPE text
        # ("Premise:", " A", " man"), not to the template as a lone space token.
        before, self._premise_lead = _move_trailing_space(before)
        middle, self._hypothesis_lead = _move_trailing_space(middle)
        self._before = self._ids(before)
        self._middle = self._ids(middle)
        self._after = self._ids(after)
        self.fixed_length = len(self._before) + len(self._middle) + len(self._after)
        if self.fixed_length >= max_length:
            raise ConfigError(f"max_length {max_length} leaves no room after the template")

    @property
    def prefix(self) -> tuple[int, ...]:
        """The token ids every encoded prompt starts with (the template before the premise).

        Their key/value states are the same for every pair, which ``nli.prefix_cache`` uses.
        """
        return tuple(self._before)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _batch_ids(self, texts: list[str]) -> list[list[int]]:
        # The Rust backend's encode_batch_fast skips offsets and the BatchEncoding wrapper:
        # identical ids in about a third of the time for SNLI-sized batches (tokenizers >= 0.20).
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Token ids of each pair's prompt, ending at the answer position."""
        if not pairs:
            return []
        texts = [self._premise_lead + _clean(p) for p, _ in pairs]
        texts += [self._hypothesis_lead + _clean(h) for _, h in pairs]
        ids = self._batch_ids(texts)
        premises, hypotheses = ids[: len(pairs)], ids[len(pairs) :]
        return [self._join(p, h) for p, h in zip(premises, hypotheses, strict=True)]

    def _join(self, premise: list[int], hypothesis: list[int]) -> list[int]:
        room = self.max_length - self.fixed_length - len(hypothesis)
        if room < 1:
            raise InputTooLongError(
                f"the hypothesis ({len(hypothesis)} tokens) does not fit the token budget "
                f"of {self.max_length} with the prompt template ({self.fixed_length} tokens)"
            )
        return self._before + premise[:room] + self._middle + hypothesis + self._after


def _move_trailing_space(text: str) -> tuple[str, str]:
    return (text[:-1], " ") if text.endswith(" ") else (text, "")


def _clean(text: str) -> str:
    # SNLI carries stray leading/trailing spaces; they change tokens but not meaning.
    return " ".join(text.split())
