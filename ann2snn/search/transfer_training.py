"""Transfer-aware fine-tuning: train the ANN with each ReLU replaced by the activation its
spiking layer will really compute - ASN: lambda f(x / lambda) (AdSNN trains with f in place of
ReLU; Zambrano et al. 2019); VSN: relu(z) H(z - T) at Ts = 1 with a fast-sigmoid surrogate
gradient, thresholds trained too (Garg & Chakraborty 2023) - optionally with a penalty on
spikes per sample. Batch norm stays and trains; it is folded at conversion. The result is an
ordinary checkpoint of the same architecture plus the layer parameters it was trained with."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from typing import Callable

import torch
from torch import fx, nn

from ann2snn import progress
from ann2snn.conversion.graph import check_activations, normalize, slot_activations, spiking_layers
from ann2snn.io.data import TensorData
from ann2snn.errors import OptionError, UserError
from ann2snn.neurons import Neuron
from ann2snn.neurons.layer import TransferLayer
from ann2snn.store.profile import ProfileLayer
from ann2snn.sim.simulate import ann_accuracy


def with_transfer(gm: fx.GraphModule, neuron: Neuron, layers: list[ProfileLayer]) -> fx.GraphModule:
    """A copy of ``gm`` with each ReLU slot replaced by its layer's transfer activation."""
    if neuron.transfer_module is None:
        raise UserError(f"neuron {neuron.name!r} has no transfer function to train with "
                        "(use an asn or vsn profile)")
    slots = spiking_layers(gm)
    if [layer.name for layer in layers] != slots:
        raise UserError("the profile's layers do not match the model's ReLUs")
    check_activations(slot_activations(gm), neuron.name, neuron.activations)
    gm = copy.deepcopy(gm)
    for layer in layers:
        module = neuron.transfer_module(layer.params)
        if not isinstance(module, TransferLayer):
            raise TypeError(f"{neuron.name}.transfer_module must return a neurons.layer.TransferLayer")
        gm.add_submodule(layer.name, module)
    gm.recompile()
    return gm


def transfer_network(model: nn.Module, neuron: Neuron, layers: list[ProfileLayer]) -> nn.Module:
    """``model`` traced (batch norm kept), each ReLU replaced by ``neuron``'s transfer
    activation with the layers' parameters; its parameters keep the model's names."""
    gm, _ = normalize(model, rewrite=False)
    return with_transfer(gm, neuron, layers)


@contextlib.contextmanager
def _deterministic_cudnn():
    """cuDNN's default backward kernels add in a varying order: the same seed gave 99.06% and
    99.04% after two identical fine-tunings on an H100. Its deterministic kernels for the run."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@_deterministic_cudnn()
def train_with_transfer(model: nn.Module, neuron: Neuron, layers: list[ProfileLayer], train: TensorData,
                        test: TensorData, epochs: int, lr: float, batch_size: int, seed: int, device: torch.device,
                        spike_penalty: float = 0.0, threshold_lr: float | None = None,
                        on_epoch: Callable[[int, float], None] | None = None
                        ) -> tuple[dict[str, torch.Tensor], list[ProfileLayer]]:
    """Train ``model`` with transfer activations on cross-entropy (classification) or squared
    error (regression) + ``spike_penalty`` x spikes per sample / 1000 (layers that count spikes),
    learnt thresholds at ``threshold_lr`` (default ``lr``: Adam moves a parameter about lr per
    step whatever its scale, and thresholds live on the activations' scale);
    returns its new state dict (original keys) and the profile's layer parameters after training."""
    torch.manual_seed(seed)
    net = transfer_network(model, neuron, layers).to(device).train()
    counters = [m for m in net.modules() if isinstance(m, TransferLayer) and m.counts_spikes]
    if spike_penalty and not counters:
        raise OptionError("spike_penalty", f": the {neuron.name} transfer function counts no spikes "
                        "(a vsn profile does)")
    regression = train.task == "regression"
    learnt = {id(q) for m in net.modules() if isinstance(m, TransferLayer) for q in m.learnt()}
    groups = [{"params": [q for q in net.parameters() if id(q) not in learnt]},
              {"params": [q for q in net.parameters() if id(q) in learnt], "lr": threshold_lr or lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for epoch in range(epochs):
        net.train()
        with progress.task(f"fine-tuning epoch {epoch + 1}/{epochs} (samples)", len(train)) as shown:
            _epoch(net, train.subset(torch.randperm(len(train), generator=gen)), batch_size, device, regression,
                   spike_penalty, counters, opt, sched, shown)
        if on_epoch:
            on_epoch(epoch + 1, ann_accuracy(net, test, 1000, device))
    tuned = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    state = model.state_dict()
    trained = [replace(layer, params=net.get_submodule(layer.name).trained_params(layer.params)) for layer in layers]
    return {k: tuned.get(k, v).contiguous().clone() for k, v in state.items()}, trained


def _epoch(net, train: TensorData, batch_size: int, device, regression: bool, spike_penalty: float, counters,
           opt, sched, shown) -> None:
    """One pass over ``train`` in batches: loss, spike penalty, a step of Adam and the schedule."""
    for x, y in train.batches(batch_size):
        out, y = net(x.to(device)), y.to(device)
        loss = nn.functional.mse_loss(out[:, 0], y.to(out.dtype)) if regression else \
            nn.functional.cross_entropy(out, y)
        if spike_penalty:
            loss = loss + spike_penalty * sum(m.spikes for m in counters) / 1000.0
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        shown.advance(len(x))
