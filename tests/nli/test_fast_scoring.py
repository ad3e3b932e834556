"""Inference speed-ups are exact: prefix cache, vectorised collate, chunked encoding, on device.

References are ``label_logits`` on whole prompts (the training loss), never the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from nli.classifier import NLIClassifier, encode_chunks
from nli.loading import LoadedBase, load_base_model
from nli.prefix_cache import PrefixCache
from nli.scoring import PEFT_BASE_ROW, collate, label_logits
from tests.nli.adapters import write_synthetic_manifest

PAIRS = [
    ("a man is playing guitar in the park", "a man plays music"),
    ("two dogs are running on the beach", "the dogs are not outside"),
    ("a woman", "a young woman is eating at a big red table in the street with a child"),
    ("the child is sitting", "a child is sitting"),
    ("people in a car", "a group of people are in a blue car on the street"),
]
# bf16 compute: the prefix's states come from a batch-1 forward, the reference's from a padded
# batch, so they differ by rounding (as two batch compositions do in test_scoring).
ATOL = 2e-3


def make_adapter(model_dir: Path, folder: Path, *, seed: int) -> Path:
    """A LoRA adapter with random (non-identity) weights and its manifest."""
    base = load_base_model(str(model_dir), device="cpu")
    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(base.model, config)
    peft_model.save_pretrained(folder)
    return write_synthetic_manifest(folder, base)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"lora{seed}", seed=seed) for seed in (1, 2)]


def reference(
    classifier: NLIClassifier, encoded: list[list[int]], names: list[str | None]
) -> np.ndarray:
    """Whole-prompt probabilities through ``label_logits`` with per-row adapters."""
    batch = collate(encoded, pad_id=classifier.tokenizer.pad_token_id)
    rows = None
    if classifier.adapters:
        rows = [PEFT_BASE_ROW if name is None else name for name in names]
    with torch.inference_mode():
        logits = label_logits(classifier.model, batch, classifier.tokens, adapter_names=rows)
    return torch.softmax(logits, dim=-1).numpy()


def test_collate_pads_right_with_mask_and_answer_positions() -> None:
    sequences = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    batch = collate(sequences, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.last_index.tolist() == [2, 0, 4]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long


def test_prefix_cached_base_scores_equal_whole_prompts(base: LoadedBase) -> None:
    cached = NLIClassifier(base, max_batch_size=2)
    assert cached.prefix_cache is not None
    encoded = cached.encode(PAIRS)
    prefix = list(cached.base_encoder.prefix)
    assert prefix and all(seq[: len(prefix)] == prefix for seq in encoded)
    expected = reference(cached, encoded, [None] * len(PAIRS))
    got = cached.score_pairs(PAIRS)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    assert len(cached.prefix_cache) == 1  # one prefix, computed once, reused by every batch
    plain = NLIClassifier(base, max_batch_size=2, prefix_cache=False).score_pairs(PAIRS)
    np.testing.assert_allclose(got, plain, atol=ATOL)
    # Input order survives length-sorted batches; repeated calls reuse the cache bit for bit.
    np.testing.assert_array_equal(cached.score_pairs(PAIRS[::-1])[::-1], got)


def test_rows_without_the_prefix_fall_back_to_whole_prompts(base: LoadedBase) -> None:
    classifier = NLIClassifier(base)
    encoded = classifier.encode(PAIRS[:2])
    odd = [encoded[0], encoded[1][1:]]  # the second row lacks the template's first token
    np.testing.assert_allclose(
        classifier.score_encoded(odd, [None, None]), reference(classifier, odd, [None, None]),
        atol=1e-6,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("count", "chunk", "first"), [(9824, 4096, 1024), (300, 4096, 64), (7, 2, 64)]
)
def test_encode_chunks_cover_every_pair_once_growing_from_one_batch(
    count: int, chunk: int, first: int
) -> None:
    bounds = encode_chunks(count, chunk, first)
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous
    sizes = [end - start for start, end in bounds]
    assert sizes[0] == min(first, chunk, count)
    assert all(size <= chunk for size in sizes)
    assert all(b == min(chunk, 2 * a) for a, b in zip(sizes, sizes[1:-1], strict=False))


def test_chunked_encoding_keeps_input_order(base: LoadedBase) -> None:
    whole = NLIClassifier(base, max_batch_size=2).score_pairs(PAIRS)
    chunked = NLIClassifier(base, max_batch_size=2, encode_chunk_size=2)
    np.testing.assert_array_equal(chunked.score_pairs(PAIRS), whole)


def test_adapters_and_mixed_batches_equal_whole_prompts(
    base: LoadedBase, adapters: list[Path]
) -> None:
    classifier = NLIClassifier(base, max_batch_size=8)
    classifier.attach_adapter(adapters[0], name="a")
    classifier.attach_adapter(adapters[1], name="b")
    try:
        encoded = classifier.encode(PAIRS)
        n = len(PAIRS)
        single = classifier.score_pairs(PAIRS, "a")
        np.testing.assert_allclose(single, reference(classifier, encoded, ["a"] * n), atol=ATOL)
        bare = classifier.score_pairs(PAIRS)
        np.testing.assert_allclose(bare, reference(classifier, encoded, [None] * n), atol=ATOL)
        assert abs(single - bare).max() > 1e-2  # the adapter matters, so the check means something

        names: list[str | None] = [None, "a", "b", "a", None, "b", "b", None, "a", None]
        rows = [encoded[i % n] for i in range(len(names))]
        mixed = classifier.score_encoded(rows, names)
        np.testing.assert_allclose(mixed, reference(classifier, rows, names), atol=ATOL)
        # Each row of the mixed batch equals its adapter scored alone, in input order.
        alone = {name: classifier.score_pairs(PAIRS, name) for name in (None, "a", "b")}
        for i, name in enumerate(names):
            np.testing.assert_allclose(mixed[i], alone[name][i % n], atol=ATOL)
        assert classifier.prefix_cache is not None
        assert classifier.prefix_cache.adapters() == {None, "a", "b"}
        # Selecting adapters for single-adapter batches leaves the LoRA weights frozen.
        lora = [p for n, p in classifier.model.named_parameters() if "lora_" in n]
        assert lora and not any(p.requires_grad for p in lora)
    finally:
        classifier.detach_adapter("a")
        classifier.detach_adapter("b")


def test_cache_is_dropped_when_a_name_gets_another_adapter(
    base: LoadedBase, adapters: list[Path]
) -> None:
    classifier = NLIClassifier(base)
    encoded = classifier.encode(PAIRS)
    classifier.attach_adapter(adapters[0], name="x")
    classifier.attach_adapter(adapters[1], name="keep")
    try:
        first = classifier.score_pairs(PAIRS, "x")
        kept = classifier.score_pairs(PAIRS, "keep")
        cache = classifier.prefix_cache
        assert isinstance(cache, PrefixCache)
        classifier.detach_adapter("x")
        assert cache.adapters() == {"keep"}
        classifier.attach_adapter(adapters[1], name="x")  # another adapter, same name
        second = classifier.score_pairs(PAIRS, "x")
        np.testing.assert_allclose(second, reference(classifier, encoded, ["x"] * 5), atol=ATOL)
        assert abs(second - first).max() > 1e-2
        np.testing.assert_array_equal(second, kept)  # same weights as "keep": same answers
    finally:
        for name in list(classifier.adapters):
            classifier.detach_adapter(name)
    assert len(cache) == 0  # the model was unwrapped: nothing cached for it survives


def test_colliding_label_tokens_score_without_the_cache(tmp_path: Path) -> None:
    from tests.conftest import build_tiny_model, build_tokenizer

    tok_dir = build_tokenizer(tmp_path / "tok", chat_template=False, merges=False)
    model_dir = build_tiny_model(tmp_path / "model", "llama", tok_dir)
    classifier = NLIClassifier(load_base_model(str(model_dir), device="cpu"))
    assert not classifier.tokens.distinct and classifier.prefix_cache is None
    probs = classifier.score_pairs(PAIRS[:2])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_compile_is_ignored_on_cpu(base: LoadedBase) -> None:
    classifier = NLIClassifier(base, compile=True)
    assert not classifier.compile
    np.testing.assert_array_equal(
        classifier.score_pairs(PAIRS), NLIClassifier(base).score_pairs(PAIRS)
    )
