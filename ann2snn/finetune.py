"""Transfer-aware fine-tuning: train the ANN with each ReLU replaced by the activation its
spiking layer will really compute, lambda f(x / lambda) (AdSNN trains with f in place of
ReLU; Zambrano et al. 2019). Batch norm stays and trains; it is folded at conversion. The
result is an ordinary checkpoint of the same architecture, to be calibrated and converted."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import fx, nn

from . import neurons
from .convert import normalize, spiking_layers
from .data import TensorData
from .errors import UserError
from .files import atomic_path
from .simulate import ann_accuracy


def with_transfer(gm: fx.GraphModule, kind, layers: list[dict]) -> fx.GraphModule:
    """A copy of ``gm`` with each ReLU slot replaced by its layer's transfer activation."""
    if not hasattr(kind, "transfer_module"):
        raise UserError(f"neuron {kind.NAME!r} has no transfer function to train with (use an asn profile)")
    slots = spiking_layers(gm)
    if [layer["name"] for layer in layers] != slots:
        raise UserError("the profile's layers do not match the model's ReLUs")
    gm = copy.deepcopy(gm)
    for layer in layers:
        gm.add_submodule(layer["name"], kind.transfer_module(layer["params"]))
    gm.recompile()
    return gm


def transfer_network(model: nn.Module, profile: dict) -> nn.Module:
    """``model`` traced (batch norm kept), each ReLU replaced by the profile neuron's transfer
    activation; its parameters keep the model's names."""
    gm, _ = normalize(model, rewrite=False)
    return with_transfer(gm, neurons.get(profile["neuron"]["type"]), profile["layers"])


def finetune(model: nn.Module, profile: dict, train: TensorData, test: TensorData, epochs: int, lr: float,
             batch_size: int, seed: int, device: torch.device,
             on_epoch: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """Train ``model`` with transfer activations; returns its new state dict (original keys)."""
    torch.manual_seed(seed)
    net = transfer_network(model, profile).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for epoch in range(epochs):
        net.train()
        for x, y in train.subset(torch.randperm(len(train), generator=gen)).batches(batch_size):
            loss = nn.functional.cross_entropy(net(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch:
            on_epoch(epoch + 1, ann_accuracy(net, test, 1000, device))
    tuned = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    state = model.state_dict()
    return {k: tuned.get(k, v).contiguous().clone() for k, v in state.items()}


def save_checkpoint(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
