"""Label scoring against a full-logits reference, batch invariance, truncation, collisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nli.classifier import NLIClassifier
from nli.errors import InputTooLongError
from nli.loading import is_4bit, load_base_model
from nli.prompt import PairEncoder, get_prompt_format, render_prompt
from nli.scoring import collate, label_logits, label_tokens, plan_batches

PAIRS = [
    ("a man is playing guitar in the park", "a man plays music"),
    ("two dogs are running on the beach", "the dogs are not outside"),
    ("a woman", "a young woman is eating at a big red table in the street with a child"),
    ("the child is sitting", "a child is sitting"),
]


@pytest.fixture(scope="module")
def classifier(tiny_model_dir: Path) -> NLIClassifier:
    base = load_base_model(str(tiny_model_dir), device="cpu")
    assert is_4bit(base.model)
    return NLIClassifier(base, max_batch_size=3)


def test_label_logits_equal_full_vocabulary_reference(classifier: NLIClassifier) -> None:
    encoded = classifier.encode(PAIRS)
    batch = collate(encoded, pad_id=classifier.tokenizer.pad_token_id)
    with torch.inference_mode():
        ours = label_logits(classifier.model, batch, classifier.tokens)
        full = classifier.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits.float()
    rows = torch.arange(len(PAIRS))
    reference = full[rows, batch.last_index][:, classifier.tokens.first_ids]
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=2e-3)


def test_probabilities_do_not_depend_on_batch_mates_or_padding(classifier: NLIClassifier) -> None:
    together = classifier.score_pairs(PAIRS)
    alone = np.concatenate([classifier.score_pairs([pair]) for pair in PAIRS])
    np.testing.assert_allclose(together, alone, atol=2e-3)
    np.testing.assert_allclose(together.sum(axis=1), 1.0, atol=1e-5)
    shuffled = classifier.score_pairs(PAIRS[::-1])[::-1]
    np.testing.assert_allclose(together, shuffled, atol=2e-3)


def test_encoding_matches_the_rendered_prompt(classifier: NLIClassifier) -> None:
    fmt = get_prompt_format()
    ids = classifier.encode([PAIRS[0]])[0]
    text = classifier.tokenizer.decode(ids)
    assert text == render_prompt(classifier.tokenizer, *PAIRS[0], fmt)


def test_truncation_cuts_the_premise_first(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fmt = get_prompt_format()
    full = PairEncoder(tokenizer, fmt, max_length=512)
    long_premise = " ".join(["a man is playing in the park"] * 40)
    untruncated = full.encode([(long_premise, "a man plays")])[0]
    short = PairEncoder(tokenizer, fmt, max_length=full.fixed_length + 20)
    ids = short.encode([(long_premise, "a man plays")])[0]
    assert len(ids) == full.fixed_length + 20 < len(untruncated)
    text = tokenizer.decode(ids)
    assert "Hypothesis: a man plays" in text  # hypothesis intact
    assert text.endswith(tokenizer.decode(untruncated[-10:]))  # template tail intact
    with pytest.raises(InputTooLongError):
        short.encode([("a man", " ".join(["a man plays"] * 30))])


def test_plan_batches_bounds_rows_and_tokens() -> None:
    lengths = [5, 50, 7, 6, 48, 9, 100]
    batches = plan_batches(lengths, max_batch_size=3, max_tokens=150)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert max(lengths[i] for i in b) * len(b) <= 150 or len(b) == 1


def test_colliding_first_tokens_fall_back_to_whole_continuations(tmp_path: Path) -> None:
    from tests.conftest import build_tiny_model, build_tokenizer

    # No merges and no chat template: every label text starts with the same space byte.
    tok_dir = build_tokenizer(tmp_path / "tok", chat_template=False, merges=False)
    model_dir = build_tiny_model(tmp_path / "model", "llama", tok_dir)
    base = load_base_model(str(model_dir), device="cpu")
    tokens = label_tokens(base.tokenizer)
    assert not tokens.distinct
    classifier = NLIClassifier(base)
    pair = ("a man", "a boy")
    probs = classifier.score_pairs([pair])[0]
    # Reference: the log-probability of each whole label continuation from full logits.
    prompt = classifier.encode([pair])[0]
    expected = []
    with torch.inference_mode():
        for seq in tokens.sequences:
            ids = torch.tensor([prompt + list(seq)])
            logp = torch.log_softmax(base.model(input_ids=ids).logits.float()[0], dim=-1)
            start = len(prompt) - 1
            expected.append(sum(float(logp[start + j, t]) for j, t in enumerate(seq)))
    reference = torch.softmax(torch.tensor(expected), dim=0).numpy()
    np.testing.assert_allclose(probs, reference, atol=2e-3)
    together = classifier.score_pairs([pair, ("two dogs run", "dogs")])[0]
    np.testing.assert_allclose(probs, together, atol=2e-3)


def test_fast_batch_tokenisation_matches_the_tokenizer_call(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    encoder = PairEncoder(tokenizer, get_prompt_format())
    texts = [" a man is playing", " two  dogs\n", "Hypothesis: the child", ""]
    slow = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert encoder._batch_ids(texts) == slow
