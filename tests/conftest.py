"""Session fixtures: a tokenizer trained here and tiny random causal LMs, through the real NF4 path.

Nothing is downloaded: the tokenizer is trained on a small synthetic corpus, the models are built
from configs with random weights. Built once per session and saved to folders, so every test
loads them exactly as a user's checkpoint would be loaded.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The offline default model is converted once into this ignored folder and reused across runs.
os.environ.setdefault("NLI_CACHE_DIR", str(REPO / ".cache" / "nli-test"))
SHARED_DATA = REPO.parent / "shared" / "data"

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "a man woman child dog cat is are the on in at with playing running sitting eating "
    "outside inside street park room table ball red blue green old young big small not "
    "two people group water car bike beach snow music guitar hammer using renovating"
).split()


def synthetic_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Sentences over a small vocabulary, plus the label words and prompt words."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    lines += ["entailment neutral contradiction Premise: Hypothesis: Answer: Classify"] * 50
    return lines


def build_tokenizer(folder: Path, *, chat_template: bool = True, merges: bool = True) -> Path:
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600 if merges else 260,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus() if merges else ["x"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return folder


def build_tiny_model(folder: Path, arch: str, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A two-layer random model of the given family, saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    if arch == "llama":  # SmolLM2's family: tied embeddings, no attention bias
        config = LlamaConfig(**common, tie_word_embeddings=True)
    elif arch == "qwen2":  # Qwen2's family: q/k/v biases, untied head
        config = Qwen2Config(**common, tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tiny_tokenizer_dir)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request: pytest.FixtureRequest) -> Path:
    """Each tiny model family in turn."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip cleanly where it is absent."""
    if not (SHARED_DATA / "snli" / "dev.jsonl").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_base() -> object:
    """The real offline default model (SmolLM2-135M-Instruct) in NF4 on CPU, loaded once."""
    from nli.loading import load_base_model

    return load_base_model(device="cpu")


@pytest.fixture()
def nli_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty NLI_CACHE_DIR for the test."""
    monkeypatch.setenv("NLI_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"
