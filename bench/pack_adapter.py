"""Copy an adapter folder with its LoRA weights stored in bf16 (half the bytes of fp32).

    python -m bench.pack_adapter SRC DST

The shipped adapter must stay small (every GPU call carries the repository). LoRA weights are
trained in fp32; bf16 storage keeps 8 exponent bits, and PEFT upcasts them again on load.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nli.manifest import WEIGHTS_FILE


def pack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name != WEIGHTS_FILE:
            shutil.copy2(path, dst / path.name)
    tensors = load_file(str(src / WEIGHTS_FILE))
    packed = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(packed, str(dst / WEIGHTS_FILE), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    pack(args.src, args.dst)


if __name__ == "__main__":
    main()
