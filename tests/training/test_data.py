"""Tokenisation cache, slices of the dev data, the length-grouped sampler, the collator."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from nli.data import Example
from nli.errors import DataError
from nli.loading import load_tokenizer
from nli.prompt import PairEncoder, get_prompt_format
from nli.scoring import collate
from training.data import (
    LabelCollator,
    LengthGroupedSampler,
    prepare_data,
    tokenize,
    tokenizer_fingerprint,
)
from training.recipe import load_config

EXAMPLES = [
    Example("a man is playing guitar", "a man plays music", 0),
    Example("two dogs run on the beach", "the dogs are inside", 2),
    Example("a child sits", "a child is eating", 1),
]


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer_dir: Path) -> PairEncoder:
    return PairEncoder(load_tokenizer(str(tiny_tokenizer_dir)), get_prompt_format(), max_length=64)


def test_tokenize_encodes_like_serving_and_caches(encoder: PairEncoder, tmp_path: Path) -> None:
    key = tokenizer_fingerprint(encoder.tokenizer, "unused")
    first = tokenize(EXAMPLES, encoder, cache=tmp_path, tokenizer_key=key, name="t")
    assert first["input_ids"] == encoder.encode([(e.premise, e.hypothesis) for e in EXAMPLES])
    assert first["labels"] == [0, 2, 1]
    assert first["length"] == [len(ids) for ids in first["input_ids"]]
    arrow = [p for p in tmp_path.iterdir() if p.suffix == ".arrow"]
    assert len(arrow) == 1
    stamp = arrow[0].stat().st_mtime_ns
    again = tokenize(EXAMPLES, encoder, cache=tmp_path, tokenizer_key=key, name="t")
    assert again["input_ids"] == first["input_ids"]
    assert arrow[0].stat().st_mtime_ns == stamp  # read back, not rewritten
    # Anything the ids depend on gives another cache entry.
    shorter = PairEncoder(encoder.tokenizer, encoder.format, max_length=63)
    tokenize(EXAMPLES, shorter, cache=tmp_path, tokenizer_key=key, name="t")
    tokenize(EXAMPLES[:2], encoder, cache=tmp_path, tokenizer_key=key, name="t")
    tokenize(EXAMPLES, encoder, cache=tmp_path, tokenizer_key="other", name="t")
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".arrow"]) == 4


def test_a_hypothesis_over_the_budget_is_a_data_error(encoder: PairEncoder, tmp_path: Path) -> None:
    long = Example("a man", " ".join(["dog"] * 200), 0)
    with pytest.raises(DataError, match="t example 2: .* hypothesis starts 'dog dog"):
        tokenize([EXAMPLES[0], long], encoder, cache=tmp_path, tokenizer_key="k", name="t")


def test_sampler_groups_lengths_and_depends_on_seed_and_epoch_only() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3, window_batches=8)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(1000))
    assert list(sampler) == epoch0  # the global RNG plays no part
    torch.manual_seed(123)
    assert list(LengthGroupedSampler(lengths, batch_size=16, seed=3, window_batches=8)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    batches = [epoch0[i : i + 16] for i in range(0, 1000, 16)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # out-of-memory shows at once
    assert len(batches[-1]) == 1000 % 16  # the short batch comes last
    padded = sum(16 * max(lengths[i] for i in b) for b in batches[:-1])
    random_padded = sum(16 * max(lengths[i] for i in range(s, s + 16)) for s in range(0, 992, 16))
    assert padded < 0.75 * random_padded


def test_sampler_gives_the_processes_of_a_step_neighbouring_batches() -> None:
    # Under DDP each process takes every world_size-th batch of the same order; the batches of
    # one step come out of one sorted window side by side, so no process waits long for another.
    rng = random.Random(1)
    lengths = [rng.randint(10, 200) for _ in range(2000)]
    order = list(LengthGroupedSampler(lengths, batch_size=16, seed=5, world_size=2))
    assert sorted(order) == list(range(2000))
    batches = [order[i : i + 16] for i in range(0, 2000, 16)]
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    for first, second in zip(spans[0:-1:2], spans[1::2], strict=True):
        assert first[1] <= second[0] or second[1] <= first[0]

    def slowest_over_mean(order: list[int]) -> float:
        cost = [16 * max(lengths[i] for i in order[s : s + 16]) for s in range(0, 1984, 32)]
        other = [16 * max(lengths[i] for i in order[s + 16 : s + 32]) for s in range(0, 1984, 32)]
        return sum(map(max, cost, other)) / (sum(cost + other) / 2)

    ungrouped = list(LengthGroupedSampler(lengths, batch_size=16, seed=5))
    assert slowest_over_mean(order) < 1.05 < slowest_over_mean(ungrouped)
    assert max(lengths[i] for i in batches[0] + batches[1]) == max(lengths)


def test_collator_matches_scoring_collate() -> None:
    features = [{"input_ids": [5, 6, 7], "labels": 2}, {"input_ids": [8], "labels": 0}]
    batch = LabelCollator(pad_id=1)(features)
    reference = collate([[5, 6, 7], [8]], pad_id=1)
    assert torch.equal(batch["input_ids"], reference.input_ids)
    assert torch.equal(batch["attention_mask"], reference.attention_mask)
    assert torch.equal(batch["last_index"], reference.last_index)
    assert batch["labels"].tolist() == [2, 0]


def test_shared_snli_splits(
    shared_data: Path, tiny_tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NLI_SNLI_DIR", raising=False)
    cfg = load_config(
        "smollm2-135m-snli",
        [
            "data.extra_train_from_dev=2000:",
            f"data.cache_dir={tmp_path}",
            "eval.test_file={snli_dir}/test.jsonl",
        ],
    )
    # The tiny tokenizer spells most SNLI words byte by byte: give it room.
    encoder = PairEncoder(
        load_tokenizer(str(tiny_tokenizer_dir)), get_prompt_format(), max_length=1024
    )
    data = prepare_data(cfg.data, cfg.eval, encoder, tokenizer_key="tiny")
    assert data.summary["train_examples"] == 21_642 + 7_842
    assert data.summary["extra_train_from_dev"] == 7_842
    assert len(data.dev) == len(data.dev_data.examples) == 2_000
    assert data.dev_data.source.endswith("dev.jsonl[:2000]")
    assert data.test_data is not None and len(data.test_data.examples) == 9_824
    assert not list(shared_data.rglob("*.arrow"))  # nothing written next to the data


@pytest.mark.parametrize("multiple", [1, 8])
def test_collator_pads_to_a_multiple_without_moving_answers(multiple: int) -> None:
    features = [{"input_ids": list(range(5, 5 + n)), "labels": n % 3} for n in (3, 9, 17, 4)]
    batch = LabelCollator(pad_id=0, pad_to_multiple_of=multiple)(features)
    width = batch["input_ids"].shape[1]
    assert width == (17 if multiple == 1 else 24)
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 9, 17, 4]
    assert batch["last_index"].tolist() == [2, 8, 16, 3]
    assert batch["labels"].tolist() == [0, 0, 2, 1]
