"""Shared fixtures: tiny models, tiny tensor data sets and an in-process CLI runner."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

torch.set_num_threads(min(torch.get_num_threads(), 2))


class TinyCNN(nn.Module):
    """Conv + BN + functional ReLU + avg pool + linear: small enough for CLI tests."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        x = torch.flatten(x, 1)
        return self.fc2(nn.functional.relu(self.fc1(x)))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_labelled(images: int, seed: int):
    """The normalised TinyCNN and ``images`` random 8x8 images labelled with its own classes
    (conversion error shows directly), as a ``TensorData``."""
    from ann2snn.conversion.graph import normalize
    from ann2snn.io.data import TensorData

    model = tiny_cnn()
    x = torch.rand(images, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return normalize(model)[0], TensorData("tiny", "file", x, y, 3)


@pytest.fixture
def tiny_files(tmp_path):
    """A checkpoint of TinyCNN and a 3-class 8x8 tensor data set the model classifies well."""
    model = tiny_cnn()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(60, 1, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the ANN gets right: conversion error shows directly
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    data = tmp_path / "tiny_data.safetensors"
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(data))
    return {"checkpoint": ckpt, "data": data, "dir": tmp_path}


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from ann2snn.app.entry import main

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["ann2snn", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
