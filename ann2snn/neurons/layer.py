"""The base classes every neuron type's modules derive from, in the manner of Norse's ``SNNCell``,
sinabs' ``StatefulLayer`` and SpikingJelly's ``MemoryModule``: the simulation, the engine,
arousal and fine-tuning see these types, never a capability probed by name.

- ``StatefulLayer``: state carried from one time step to the next; ``reset()`` starts an input.
  The simulation resets every module of this type per batch (neurons, gated max pools, bias ramps).
- ``SpikingLayer``: one layer of a neuron type. Its state (the neuron's ``NamedTuple``, None
  before the first step) starts on the first step (``initial_state``) and advances once per
  call (``step``); ``spikes`` keeps the last step's events for accounting. Its ``backend`` says how
  a chunk of steps runs, chosen from its parameters when it is built and reported: "fused"
  (``scan``, one kernel for the chunk that also counts), "compiled" (the neuron's functional step
  through ``torch.compile``: ``compiled.py``, opt-in; ``forward`` step by step, or IF's ``scan``
  with its step body compiled, ``scans_chunks``) or "reference"
  (``forward`` step by step).
  ``set_precision`` is arousal's switch, for neuron types with ``Neuron.precision_control``;
  ``place`` tells a time code (``window`` > 0) the step its window opens.
- ``TransferLayer``: the differentiable stand-in that fine-tuning trains (``Neuron.transfer_module``).
"""

from __future__ import annotations

import torch
from torch import nn

BACKENDS = ("fused", "compiled", "reference")


def per_channel(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` shaped to broadcast against ``like`` [B, C, ...]: one value per channel (a [C]
    vector) gets trailing singleton dimensions; a scalar stays as it is."""
    return value.view((-1,) + (1,) * (like.dim() - 2)) if value.dim() else value


class StatefulLayer(nn.Module):
    """A module whose state carries from one time step to the next."""

    def reset(self) -> None:
        raise NotImplementedError


class SpikingLayer(StatefulLayer):
    """One spiking layer: state, last spikes, backend (see the module docstring)."""

    backend = "reference"
    scans_chunks = False  # ``scan`` runs a whole chunk of steps (the "fused" backend; IF's also when "compiled")
    window = 0  # steps of a time code's window (``place``); 0: a rate code, active from the first step

    def __init__(self):
        super().__init__()
        self.state = None
        self.spikes: torch.Tensor | None = None

    def reset(self) -> None:
        self.state, self.spikes = None, None

    def initial_state(self, current: torch.Tensor):
        """The state before the first step, for an input current shaped like ``current``."""
        raise NotImplementedError

    def step(self, current: torch.Tensor) -> torch.Tensor:
        """Advance ``self.state`` one step; set ``self.spikes``; return the output current."""
        raise NotImplementedError

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            self.state = self.initial_state(current)
        return self.step(current)

    def scan(self, current: torch.Tensor, steps: int, batch: int, fan: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` calls of ``forward`` at once, with per-step [spikes, synaptic operations]
        counts: the "fused" backend only."""
        raise TypeError(f"{type(self).__name__} runs on the reference backend: it has no fused scan")

    def place(self, start: int) -> None:
        """The step the layer's window opens (``graph.slot_schedule``: when every layer feeding it
        has closed its own ``window``). A time code fires in [start, start + window); rate codes
        (``window`` 0) run from the first step and ignore it."""

    def set_precision(self, samples: torch.Tensor, value: float) -> None:
        """From the next step on, the ``samples`` (a boolean mask over the batch) run at the
        precision ``value`` (``PrecisionControl.value``): arousal."""
        raise TypeError(f"{type(self).__name__}: this neuron type has no precision control")

    def running_state(self):
        """The state of a running simulation (``set_precision`` acts on one)."""
        if self.state is None:
            raise RuntimeError("set_precision needs a running simulation")
        return self.state


class TransferLayer(nn.Module):
    """A layer's differentiable stand-in for fine-tuning. ``counts_spikes``: ``spikes`` holds a
    differentiable spike count per sample after each forward (a spike penalty uses it);
    ``learnt()``: its own parameters, trained at the threshold learning rate; ``trained_params``:
    the layer's profile parameters after training."""

    counts_spikes = False

    def learnt(self) -> list[nn.Parameter]:
        return []

    def trained_params(self, params: dict) -> dict:
        return params
