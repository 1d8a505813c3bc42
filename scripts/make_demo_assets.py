#!/usr/bin/env python3
"""Rebuild the files that ship in ann2snn/assets for ``ann2snn demo``.

  python scripts/train_reference.py --model lenet5 --dataset mnist --epochs 8 --seed 0 \
      -o checkpoints/lenet5_mnist.safetensors
  python scripts/make_demo_assets.py checkpoints/lenet5_mnist.safetensors

Copies the checkpoint and writes two tensor files of MNIST images (uint8) and labels: 1,000
drawn from the training split for calibration and the first 1,000 of the test split.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ann2snn.io.data import calibration_subset, open_dataset

ASSETS = Path(__file__).resolve().parents[1] / "ann2snn" / "assets"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args()
    ASSETS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.checkpoint, ASSETS / "lenet5_mnist.safetensors")
    calib = calibration_subset(open_dataset("mnist", "train", args.data_dir), args.samples, seed=0)
    test = open_dataset("mnist", "test", args.data_dir).head(args.samples)
    for name, data in (("mnist_calib", calib), ("mnist_test", test)):
        save_file({"inputs": data.inputs.contiguous(), "targets": data.targets.to(torch.uint8).contiguous()},
                  str(ASSETS / f"{name}.safetensors"))
        print(f"wrote {ASSETS / name}.safetensors: {tuple(data.inputs.shape)}")


if __name__ == "__main__":
    main()
