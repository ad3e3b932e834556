"""The fast adapter attach (``nli.lora_fast_attach``) leaves exactly the state PEFT's load does.

Every comparison is against the same steps run with the fast path switched off (PEFT's
``load_adapter``), on the same base model: scores must be bit-identical, and so must the
adapter's parameters, its config and the LoRA layers' bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file, save_file

from nli import lora_fast_attach
from nli.classifier import NLIClassifier
from nli.errors import AdapterInvalidError
from nli.loading import LoadedBase, load_base_model
from nli.manifest import WEIGHTS_FILE
from nli.scoring import split_peft
from tests.nli.adapters import ALL, PAIRS, make_adapter


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fast-attach")
    specs: dict[str, dict[str, Any]] = {
        "first": dict(seed=1),
        "fp32": dict(seed=2),
        "bf16": dict(seed=3, dtype=torch.bfloat16),
        "rank8": dict(seed=4, r=8),
        "rank8-bf16": dict(seed=5, r=8, dtype=torch.bfloat16, use_rslora=True),
        "dropout": dict(seed=6, lora_dropout=0.1, init_lora_weights="gaussian"),
        "trained": dict(seed=9, init_lora_weights=True),  # as nli-train's adapters say
        "attention": dict(seed=7, target_modules=["q_proj", "v_proj"]),
        "rank-pattern": dict(seed=8, rank_pattern={"q_proj": 8}),
    }
    out = {}
    for name, spec in specs.items():
        kwargs = dict(spec)
        init = kwargs.pop("init_lora_weights", None)
        folder = make_adapter(tiny_model_dir, root / name, **kwargs)
        if init is not None:  # an init that only decides starting weights, as trained ones have
            import json

            config_file = folder / "adapter_config.json"
            data = json.loads(config_file.read_text())
            data["init_lora_weights"] = init
            config_file.write_text(json.dumps(data))
        out[name] = folder
    return out


@pytest.fixture()
def injections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the adapters PEFT's inject_adapter handled (i.e. not the fast path)."""
    calls: list[str] = []
    original = BaseTuner.inject_adapter

    def spy(self: Any, model: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(adapter_name)
        return original(self, model, adapter_name, *args, **kwargs)

    monkeypatch.setattr(BaseTuner, "inject_adapter", spy)
    return calls


@pytest.fixture()
def classifier(base: LoadedBase) -> Iterator[NLIClassifier]:
    classifier = NLIClassifier(base, max_batch_size=4)
    classifier.score_pairs(PAIRS)  # bitsandbytes' CPU repack happens at the first forward
    yield classifier
    for name in list(classifier.adapters):
        classifier.detach_adapter(name)
    assert split_peft(classifier.model)[1] is None


def no_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_fast_attach, "prepare", lambda path, **_: None)


def adapter_state(classifier: NLIClassifier, name: str) -> list[Any]:
    """Everything PEFT keeps about one adapter, in order, weights included."""
    _, peft_model = split_peft(classifier.model)
    assert peft_model is not None
    tuner = peft_model.base_model
    state: list[Any] = [
        peft_model.peft_config[name].to_dict(),
        list(peft_model.peft_config),
        list(tuner.targeted_module_names),
        tuner.active_adapter,
        classifier.model.training,
    ]
    for key, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "scaling"):
            state.append(
                (
                    key,
                    list(module.lora_A),
                    list(module.lora_B),
                    list(module.lora_dropout),
                    {k: v for k, v in module.r.items()},
                    dict(module.lora_alpha),
                    dict(module.scaling),
                    dict(module.use_dora),
                    dict(module.use_rslora),
                    dict(module.lora_bias),
                    module.active_adapters,
                    module.disable_adapters,
                    module.merged_adapters,
                )
            )
        if name in key.split("."):
            state.append((key, type(module).__name__, module.training))
    for key, param in peft_model.named_parameters():
        state.append((key, param.dtype, param.requires_grad, param.shape, param.device))
        if f".{name}." in key:
            state.append(param.detach().clone())
    return state


def assert_same_state(fast: list[Any], peft: list[Any]) -> None:
    assert len(fast) == len(peft)
    for a, b in zip(fast, peft, strict=True):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a == b


def run_swaps(classifier: NLIClassifier, adapters: dict[str, Path], names: list[str]) -> list[Any]:
    """Attach, score, detach and re-attach; every score and adapter state along the way."""
    results: list[Any] = []
    classifier.attach_adapter(adapters["first"], name="first")
    for name in names:
        classifier.attach_adapter(adapters[name], name=name)
        results.append(adapter_state(classifier, name))
        results.append(classifier.score_pairs(PAIRS, name))
    every: list[str | None] = [None, "first", *names]
    for name in every:
        results.append(classifier.score_pairs(PAIRS, name))
    encoded = [seq for name in every for seq in classifier.encode(PAIRS, name)]
    rows = [name for name in every for _ in PAIRS]
    results.append(classifier.score_encoded(encoded, rows))  # mixed: PEFT's per-row path
    classifier.detach_adapter(names[0])
    for name in [None, "first", *names[1:]]:
        results.append(classifier.score_pairs(PAIRS, name))
    classifier.attach_adapter(adapters[names[0]], name="again")
    results.append(adapter_state(classifier, "again"))
    results.append(classifier.score_pairs(PAIRS, "again"))
    classifier.detach_adapter("first")
    results.append(classifier.score_pairs(PAIRS, "again"))
    return results


def assert_same_results(fast: list[Any], peft: list[Any]) -> None:
    assert len(fast) == len(peft)
    for a, b in zip(fast, peft, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert_same_state(a, b)


SWAPS = ["fp32", "bf16", "rank8", "rank8-bf16", "dropout", "trained"]


def test_fast_attach_equals_peft_load_exactly(
    base: LoadedBase,
    adapters: dict[str, Path],
    injections: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    classifier = NLIClassifier(base, max_batch_size=4)
    classifier.score_pairs(PAIRS)
    fast = run_swaps(classifier, adapters, SWAPS)
    assert injections == ["first"]  # every later adapter took the fast path
    for name in list(classifier.adapters):
        classifier.detach_adapter(name)

    no_fast_path(monkeypatch)
    peft = run_swaps(classifier, adapters, SWAPS)
    assert injections == ["first", "first", *SWAPS, "again"]
    for name in list(classifier.adapters):
        classifier.detach_adapter(name)
    assert_same_results(fast, peft)
    # The adapters differ from each other, so equal scores mean something.
    scores = [fast[2 * i + 1] for i in range(len(SWAPS))]
    assert all(abs(a - b).max() > 1e-3 for a, b in zip(scores, scores[1:], strict=False))


@pytest.mark.parametrize("quantization", ["expanded", "none"])
def test_fast_attach_equals_peft_load_on_other_bases(
    tiny_model_dir: Path,
    adapters: dict[str, Path],
    injections: list[str],
    monkeypatch: pytest.MonkeyPatch,
    quantization: str,
) -> None:
    """NF4 held expanded (bf16 nn.Linear, NLI_DEQUANTIZE) and an unquantized base."""
    if quantization == "expanded":
        base = load_base_model(str(tiny_model_dir), device="cpu", dequantize=True)
    else:
        base = load_base_model(str(tiny_model_dir), quantization="none", device="cpu")
    results = []
    for fast in (True, False):
        if not fast:
            no_fast_path(monkeypatch)
        classifier = NLIClassifier(base, max_batch_size=4)
        classifier.score_pairs(PAIRS)
        results.append(run_swaps(classifier, adapters, ["bf16", "rank8"]))
        for name in list(classifier.adapters):
            classifier.detach_adapter(name)
    assert injections == ["first", "first", "bf16", "rank8", "again"]
    assert_same_results(*results)


def test_bf16_weights_load_as_float32(
    classifier: NLIClassifier, adapters: dict[str, Path], injections: list[str]
) -> None:
    classifier.attach_adapter(adapters["first"], name="first")
    classifier.attach_adapter(adapters["bf16"], name="bf16")
    assert injections == ["first"]
    lora = [p for n, p in classifier.model.named_parameters() if ".bf16." in n]
    assert lora and all(p.dtype == torch.float32 and not p.requires_grad for p in lora)
    stored = load_file(adapters["bf16"] / WEIGHTS_FILE)
    some = next(k for k in stored if "lora_B" in k)
    module_key = some.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    _, peft_model = split_peft(classifier.model)
    assert peft_model is not None
    weight = peft_model.base_model.model.get_submodule(module_key).lora_B["bf16"].weight
    torch.testing.assert_close(weight, stored[some].float(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "first, other, after, after_is_fast",
    [
        # rank_pattern is not plain LoRA; while such an adapter is attached, PEFT loads all
        ("first", "rank-pattern", "fp32", False),
        # targets modules that hold no LoRA layer yet
        ("attention", "fp32", "rank8", True),
    ],
)
def test_what_the_fast_path_cannot_do_goes_through_peft(
    classifier: NLIClassifier,
    adapters: dict[str, Path],
    injections: list[str],
    monkeypatch: pytest.MonkeyPatch,
    first: str,
    other: str,
    after: str,
    after_is_fast: bool,
) -> None:
    classifier.attach_adapter(adapters[first], name="first")
    classifier.attach_adapter(adapters[other], name="other")
    assert injections == ["first", "other"]
    got = classifier.score_pairs(PAIRS, "other")
    # After PEFT changed the model, its LoRA layers are indexed anew: the next one is fast.
    classifier.attach_adapter(adapters[after], name="after")
    assert injections == ["first", "other"] + ([] if after_is_fast else ["after"])
    got_after = classifier.score_pairs(PAIRS, "after")
    classifier.detach_adapter("other")
    classifier.attach_adapter(adapters["bf16"], name="last")
    assert injections[-1] != "last"
    got_last = classifier.score_pairs(PAIRS, "last")
    for name in list(classifier.adapters):
        classifier.detach_adapter(name)

    no_fast_path(monkeypatch)
    classifier.attach_adapter(adapters[first], name="first")
    classifier.attach_adapter(adapters[other], name="other")
    np.testing.assert_array_equal(classifier.score_pairs(PAIRS, "other"), got)
    classifier.attach_adapter(adapters[after], name="after")
    np.testing.assert_array_equal(classifier.score_pairs(PAIRS, "after"), got_after)
    classifier.detach_adapter("other")
    classifier.attach_adapter(adapters["bf16"], name="last")
    np.testing.assert_array_equal(classifier.score_pairs(PAIRS, "last"), got_last)


def test_adapter_on_a_subset_of_the_layers_is_fast(
    classifier: NLIClassifier,
    adapters: dict[str, Path],
    injections: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    classifier.attach_adapter(adapters["first"], name="first")
    classifier.attach_adapter(adapters["attention"], name="attention")
    assert injections == ["first"]
    fast = [adapter_state(classifier, "attention"), classifier.score_pairs(PAIRS, "attention")]
    classifier.detach_adapter("attention")
    classifier.detach_adapter("first")

    no_fast_path(monkeypatch)
    classifier.attach_adapter(adapters["first"], name="first")
    classifier.attach_adapter(adapters["attention"], name="attention")
    peft = [adapter_state(classifier, "attention"), classifier.score_pairs(PAIRS, "attention")]
    assert_same_results(fast, peft)


def _edit(folder: Path, change: Any) -> None:
    save_file(change(load_file(folder / WEIGHTS_FILE)), folder / WEIGHTS_FILE, {"format": "pt"})


CORRUPT = {
    "nan": (
        lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()},
        "NaN or inf",
    ),
    "half": (lambda t: {k: t[k] for k in sorted(t)[: len(t) // 2]}, "of its .* are missing"),
    "renamed": (
        lambda t: {k.replace("lora_A", "lora_Z"): v for k, v in t.items()},
        "tensors are not the adapter's",
    ),
    "shape": (lambda t: {k: torch.cat([v, v]) for k, v in t.items()}, "size mismatch"),
    "ints": (lambda t: {k: v.to(torch.int32) for k, v in t.items()}, "."),
}


@pytest.mark.parametrize("corruption", list(CORRUPT))
def test_invalid_weights_are_refused_as_before_and_change_nothing(
    classifier: NLIClassifier,
    adapters: dict[str, Path],
    tmp_path: Path,
    corruption: str,
) -> None:
    import shutil

    classifier.attach_adapter(adapters["first"], name="first")
    before = classifier.score_pairs(PAIRS, "first")
    _, peft_model = split_peft(classifier.model)
    assert peft_model is not None
    params = [n for n, _ in peft_model.named_parameters()]
    folder = shutil.copytree(adapters["fp32"], tmp_path / "broken")
    change, message = CORRUPT[corruption]
    _edit(folder, change)
    if corruption == "ints":  # PEFT's own load accepts these; the fast path must not
        classifier.attach_adapter(folder, name="broken")
        classifier.detach_adapter("broken")
    else:
        with pytest.raises(AdapterInvalidError, match=message):
            classifier.attach_adapter(folder, name="broken")
    assert list(classifier.adapters) == ["first"]
    assert list(peft_model.peft_config) == ["first"]
    assert [n for n, _ in peft_model.named_parameters()] == params
    np.testing.assert_array_equal(classifier.score_pairs(PAIRS, "first"), before)
    classifier.attach_adapter(adapters["fp32"], name="fine")  # and the fast path still works
    assert classifier.score_pairs(PAIRS, "fine").shape == (len(PAIRS), 3)


def test_prepare_from_bytes_reads_what_the_file_holds(adapters: dict[str, Path]) -> None:
    folder = adapters["fp32"]
    from_file = lora_fast_attach.prepare(folder)
    data = (folder / WEIGHTS_FILE).read_bytes()
    from_bytes = lora_fast_attach.prepare(folder, weights=data)
    assert from_file is not None and from_bytes is not None
    assert from_bytes.tensors.keys() == from_file.tensors.keys()
    for key, tensor in from_file.tensors.items():
        assert torch.equal(from_bytes.tensors[key], tensor)
    # bytes that are no safetensors file: PEFT's path decides (and reports it)
    assert lora_fast_attach.prepare(folder, weights=data[:100]) is None


def test_plain_lora_configs() -> None:
    assert lora_fast_attach.is_plain_lora(LoraConfig(target_modules=ALL))
    assert lora_fast_attach.is_plain_lora(LoraConfig(r=16, target_modules=["q_proj"]))
    for unsupported in (
        LoraConfig(target_modules="all-linear"),
        LoraConfig(target_modules=None),
        LoraConfig(target_modules=ALL, use_dora=True),
        LoraConfig(target_modules=ALL, rank_pattern={"q_proj": 2}),
        LoraConfig(target_modules=ALL, alpha_pattern={"q_proj": 2}),
        LoraConfig(target_modules=ALL, modules_to_save=["lm_head"]),
        LoraConfig(target_modules=ALL, bias="all"),
        LoraConfig(target_modules=ALL, lora_bias=True),
        LoraConfig(target_modules=ALL, init_lora_weights="pissa"),
        LoraConfig(target_modules=ALL, layers_to_transform=[0]),
        LoraConfig(target_modules=[*ALL, "lm_head"]),
    ):
        assert not lora_fast_attach.is_plain_lora(unsupported), unsupported


def test_loading_asks_the_hub_nothing(
    classifier: NLIClassifier,
    adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PEFT's weight check would ask the hub about a base named by id; the classifier never does."""
    import json
    import shutil

    import peft.utils.save_and_load as save_and_load

    folder = tmp_path / "hub-named"
    shutil.copytree(adapters["first"], folder)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "some-org/some-base-model"
    config_file.write_text(json.dumps(config))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked: list[Any] = []
    monkeypatch.setattr(
        save_and_load, "check_file_exists_on_hf_hub", lambda *args, **kwargs: asked.append(args)
    )
    classifier.attach_adapter(folder, name="hub-named")  # the first adapter: PEFT's path
    assert asked == []
    np.testing.assert_allclose(
        classifier.score_pairs(PAIRS, "hub-named").sum(axis=1), 1.0, rtol=1e-5
    )
