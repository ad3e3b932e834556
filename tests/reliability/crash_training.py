"""Run a training recipe and kill the process (SIGKILL, no clean-up of any kind) at one point of
saving the adapter. Used by ``test_faults`` as ``python -m tests.reliability.crash_training``.

Points:

- ``weights``: while PEFT writes ``adapter_model.safetensors``: half the bytes are on disk.
- ``report``: everything is written but the training report, the last file before the rename.
- ``swap``: with ``output.overwrite``, between moving the old adapter aside and renaming the new
  one into place (the only moment the name has no folder).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

POINTS = ("weights", "report", "swap")


def die(point: str) -> None:
    # stderr is the test's evidence that the process died where it was meant to.
    sys.stderr.write(f"crash_training: killed at {point}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, output: Path) -> None:
    """Patch the one call where the process must die."""
    import training.train

    if point == "weights":
        import peft.peft_model
        from safetensors.torch import save

        def half_then_die(tensors: dict[str, Any], filename: str, **kwargs: Any) -> None:
            data = save(tensors, metadata=kwargs.get("metadata"))
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            die(point)

        save_adapter = training.train._save_adapter

        def save_adapter_and_die(*args: Any, **kwargs: Any) -> Any:
            # Only the adapter's own save (Trainer checkpoints use the same PEFT call).
            peft.peft_model.safe_save_file = half_then_die  # the name PEFT 0.21 calls
            return save_adapter(*args, **kwargs)

        training.train._save_adapter = save_adapter_and_die
    elif point == "report":
        training.train.write_training_report = lambda report, folder: die(point)
    elif point == "swap":
        real_rename = os.rename

        def rename(source: Any, target: Any) -> None:
            if Path(target) == output and Path(source).name.endswith(".partial"):
                die(point)  # the old folder is already aside
            real_rename(source, target)

        os.rename = rename  # what nli.fsutil.atomic_directory calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("point", choices=POINTS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from training.recipe import load_config
    from training.train import run_training

    cfg = load_config(str(args.recipe))
    arm(args.point, cfg.output_dir().absolute())
    run_training(cfg, progress=False)
    sys.stderr.write("crash_training: finished without being killed\n")


if __name__ == "__main__":
    main()
