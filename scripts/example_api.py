#!/usr/bin/env python3
"""The Python API end to end on the bundled LeNet-5 and MNIST samples (offline): calibrate IF
and ASN, convert, evaluate side by side, save and load. The tests run it with --quick.

  python scripts/example_api.py            # 1,000 test images
  python scripts/example_api.py --quick    # 200 test images, fewer steps
"""

from __future__ import annotations

import argparse
import tempfile
from importlib.resources import files
from pathlib import Path

import torch
from safetensors.torch import load_file

import ann2snn
from ann2snn.io.zoo import lenet5


def mnist(name: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bundled MNIST samples as float inputs in [0, 1] (what the reference LeNet-5 was trained on)."""
    d = load_file(str(files("ann2snn") / "assets" / name))
    return d["inputs"][:limit].float() / 255.0, d["targets"][:limit].long()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    model = lenet5()
    model.load_state_dict(load_file(str(files("ann2snn") / "assets" / "lenet5_mnist.safetensors")))
    calib, test = mnist("mnist_calib.safetensors"), mnist("mnist_test.safetensors", 200 if a.quick else None)
    runs = {"if": 32 if a.quick else 64, "asn": 60 if a.quick else 200}
    for neuron, steps in runs.items():
        profile = ann2snn.calibrate(model, calib, neuron=neuron, samples=100 if a.quick else 1000, device=a.device)
        snn = ann2snn.convert(model, profile)
        report = ann2snn.evaluate(snn, test, timesteps=steps, device=a.device)
        print(f"{neuron.upper()} ({', '.join(f'{k}={v}' for k, v in profile.neuron.options.items())}): "
              f"accuracy {100 * report.accuracy:.2f}% (ANN {100 * report.ann['accuracy']:.2f}%) after {steps} steps, "
              f"{report.spikes_per_sample:,.0f} spikes per sample")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"lenet5_{neuron}.snn.safetensors"
            ann2snn.save(snn, path)
            again = ann2snn.load(path, lenet5())
            assert torch.equal(again.run(test[0][:8], 5), snn.run(test[0][:8], 5))


if __name__ == "__main__":
    main()
