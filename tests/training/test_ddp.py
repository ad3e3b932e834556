"""The same training command under ``torchrun``: DDP on two CPU processes (gloo).

The GPU path differs only in the device (``cuda:<LOCAL_RANK>``), so CPU processes check what
matters: gradients are synchronised through ``LabelScoringModel.forward`` (both ranks end with
identical adapter weights, different from either rank training alone), the data is split
between the ranks, and only rank 0 writes the adapter folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nli.manifest import WEIGHTS_FILE

from .conftest import RecipeWriter

WORKER = """
import hashlib, json, os, sys
import torch
from transformers import TrainerCallback
from training.recipe import load_config
from training.train import run_training

class DumpWeights(TrainerCallback):
    # At the last optimizer step, before the best checkpoint (written by rank 0) is loaded back
    # into every rank, which would make the ranks equal whether or not gradients were synced.
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != state.max_steps:
            return
        weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        torch.save(weights, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))

output = run_training(load_config(sys.argv[1]), callbacks=[DumpWeights()], progress=False)
with open(os.path.join(sys.argv[2], f"result{os.environ['RANK']}.json"), "w") as f:
    json.dump({"output": str(output) if output else None}, f)
"""


def test_ddp_ranks_stay_in_sync_and_only_rank_0_writes(
    tmp_path: Path, tiny_recipe: RecipeWriter
) -> None:
    recipe = tiny_recipe(
        tmp_path,
        train={"max_steps": 6, "learning_rate": 1e-2},
        eval={"strategy": "steps", "steps": 6, "compare_base": False},
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29517", str(script), str(recipe), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], atol=0, rtol=0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)  # it trained
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
    output = Path(results[0]["output"])
    assert results[1]["output"] is None
    saved = load_file(output / WEIGHTS_FILE)
    assert len(saved) == len(rank0)
    report = json.loads((output / "report.json").read_text())
    assert report["environment"]["world_size"] == 2
    # Each rank sees half of every global batch of 2 x 16 examples.
    assert report["training"]["steps"] == 6
    assert report["training"]["examples_seen"] == 6 * 2 * 16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture(autouse=True)
def _no_gpu_here() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU DDP check; the GPU run is the lead's benchmark")


@pytest.mark.parametrize(("world_size", "expected"), [(1, 1), (2, 2)])
def test_a_lone_process_trains_on_one_of_several_visible_gpus(
    tmp_path: Path, world_size: int, expected: int
) -> None:
    """Without torchrun, Trainer would wrap the model in nn.DataParallel over every visible
    GPU; a host with two GPUs is simulated by the count TrainingArguments found."""
    from transformers import TrainingArguments

    from training.trainer import one_gpu_per_process

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.n_gpu == 0  # devices set up: CPU here
    args._n_gpu = 2
    assert one_gpu_per_process(args, world_size=world_size).n_gpu == expected
