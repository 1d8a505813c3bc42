#!/usr/bin/env python3
"""Train a zoo model on a data set and write a safetensors checkpoint (plus a JSON summary).

  python scripts/train_reference.py --model lenet5 --dataset mnist --epochs 6 --seed 0 \
      -o checkpoints/lenet5_mnist.safetensors

Adam with a one-cycle learning-rate schedule; deterministic for a seed on CPU. Prints the test
accuracy after every epoch. ``--holdout`` trains on the ``fit`` split only, so that settings can
be chosen on the held-out ``val`` split (``--split val`` of calibrate and evaluate); the test
accuracy printed after each epoch is a report, never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from ann2snn.app.cli import key_values
from ann2snn.io.data import Normalize, open_dataset
from ann2snn.io.files import write_safetensors, write_text
from ann2snn.sim.simulate import ann_accuracy, resolve_device
from ann2snn.io.zoo import model_kwargs, resolve_model


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    norm = Normalize.parse(args.normalize)
    train_set = open_dataset(args.dataset, "fit" if args.holdout else "train", args.data_dir, False, norm)
    test_set = open_dataset(args.dataset, "test", args.data_dir, False, norm)
    user = key_values(args.model_arg, "--model-arg")
    kwargs = model_kwargs(args.model, train_set.sample_shape, train_set.num_classes, user)
    model = resolve_model(args.model, kwargs).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * ((len(train_set) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        model.train()
        start = time.time()
        shuffled = train_set.subset(torch.randperm(len(train_set), generator=gen))
        for x, y in shuffled.batches(args.batch_size):
            x, y = x.to(device), y.to(device)
            if args.augment and x.dim() == 4:
                shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
                x = torch.roll(x, shifts=shift, dims=(2, 3))
            out = model(x)
            loss = nn.functional.mse_loss(out.reshape(len(y), -1)[:, 0], y) if train_set.task == "regression" \
                else nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = ann_accuracy(model, test_set, 1000, device)
        history.append(acc)
        shown = f"NMSE {acc:.5f}" if test_set.task == "regression" else f"accuracy {100 * acc:.2f}%"
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, test {shown} "
              f"({time.time() - start:.0f} s)", flush=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(args.output, state, {"model": args.model, "dataset": args.dataset})
    summary = {"model": args.model, "kwargs": kwargs, "dataset": args.dataset, "normalize": args.normalize,
               "epochs": args.epochs, "seed": args.seed, "task": test_set.task,
               "trained_on": f"{train_set.split} split ({len(train_set)} samples)",
               "test_accuracy" if test_set.task == "classification" else "test_nmse": history[-1], "history": history}
    write_text(Path(args.output).with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return summary


def test_metric(summary: dict) -> str:
    if summary["task"] == "regression":
        return f"NMSE {summary['test_nmse']:.5f}"
    return f"accuracy {100 * summary['test_accuracy']:.2f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor argument, as for 'ann2snn calibrate --model-arg'")
    p.add_argument("--dataset", required=True)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--augment", action="store_true", help="random shifts of up to 2 pixels")
    p.add_argument("--normalize", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", action="store_true", help="train on the 'fit' split only, keeping 'val' (the last "
                                                          "1/12 of the training split) for choosing settings")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    summary = train(args)
    print(f"wrote {args.output}: {args.model} on {args.dataset}, test {test_metric(summary)}")


if __name__ == "__main__":
    main()
