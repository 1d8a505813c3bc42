#!/usr/bin/env python3
"""Random weights and images for timing runs (``bench_gpu.sh``): a seeded model's state dict as
safetensors, and an image tensor file whose targets are that model's own classes, so the
accuracy column of a timing bench reads as agreement with the ANN. Not for accuracy figures.

  python scripts/make_random_inputs.py --model resnet18 --shape 3,32,32 --classes 10 \\
      --images 4096 --out runs/bench_gpu/resnet18_32
  python scripts/make_random_inputs.py --model torchvision.models:resnet18 --shape 3,224,224 \\
      --classes 1000 --images 2048 --out runs/bench_gpu/tv_resnet18_224

Writes OUT.safetensors (weights) and OUT.data.safetensors (inputs, targets).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from ann2snn.io.zoo import model_kwargs, resolve_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo name or package.module:callable")
    p.add_argument("--shape", required=True, help="C,H,W of one image")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=None, help="zoo models: the width argument")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.manual_seed(args.seed)
    # the constructor arguments bench_simulation.py passes back with --model-arg
    user = {"num_classes": args.classes, **({} if args.width is None else {"width": args.width})}
    model = resolve_model(args.model, model_kwargs(args.model, shape, args.classes, user)).eval()
    with torch.no_grad():  # batch-norm statistics of a trained net's scale, not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.1, 0.1)
    x = torch.rand(args.images, *shape, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        y = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out) + ".safetensors")
    save_file({"inputs": x, "targets": y}, str(args.out) + ".data.safetensors")
    print(f"wrote {args.out}.safetensors and {args.out}.data.safetensors ({len(x)} images {shape})")


if __name__ == "__main__":
    main()
