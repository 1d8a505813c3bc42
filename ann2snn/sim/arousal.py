"""Arousal: per-input precision control (AdSNN, Zambrano et al. 2019, docs/science.md section 1).

The network runs at low precision (ASN: high m_f; VSN with Ts > 1: its calibrated thresholds).
At a decision time - and optionally at later re-check times - each input whose readout is
uncertain is aroused: its certainty c, from its two highest softmax scores p1 >= p2, is below
``threshold``, with c = p1 - p2 (``test=margin``, default) or c = 1 - p2 / p1 (``test=ratio``);
then every ASN layer (or each of ``layers``, when named) switches that input to high precision (low
m_f; theta0 and h follow), every VSN layer to thresholds x ``threshold_scale``, for the rest of
the presentation, inside the batched simulation and without restarting it. Other inputs keep
low precision. What "precision" means is the neuron's (``Neuron.precision_control``): the
policy field its modules' ``set_precision`` takes, the start and raised parameters, the labels.
The policy is ``neurons/arousal_policy.py``; ``evaluation/plan.py`` lays out the three
simulations ``evaluate --arousal`` makes: under arousal control, fixed low and fixed high precision.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ann2snn.errors import OptionError
from ann2snn.neurons import PrecisionControl
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.store.profile import ProfileLayer


def certainty(score: torch.Tensor, test: str = "margin") -> torch.Tensor:
    """Per-input certainty in [0, 1] of readout scores (batch, classes): with p1 >= p2 the two
    highest softmax scores, ``margin`` = p1 - p2, ``ratio`` = 1 - p2 / p1; 0 is a tie."""
    top2 = torch.softmax(score.float(), 1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1] if test == "margin" else 1 - top2[:, 1] / top2[:, 0]


def check_class_scores(dataset: str, task: str, outputs: int) -> None:
    """Arousal tests the readout's two highest class scores: refuse regression and one-output networks."""
    if task != "classification" or outputs < 2:
        what = "a regression data set" if task != "classification" else f"read out by {outputs} output"
        raise OptionError("arousal", f": the uncertainty test compares the two highest class scores; "
                        f"{{{{dataset}}}} {dataset} is {what}")


class ArousalController:
    """Called by the simulator after every step with the readout score (see ``simulate``)."""

    def __init__(self, policy: ArousalPolicy, control: PrecisionControl):
        self.policy, self.control, self.value = policy, control, control.value(policy)
        self.aroused_total = 0
        self.samples = 0
        self.aroused: torch.Tensor | None = None

    @property
    def decision_steps(self) -> tuple[int, ...]:
        """Steps (1-based) after which it may change the network: a chunked simulation ends a chunk there."""
        return (self.policy.at, *self.policy.recheck)

    def reset(self, batch: int, device: torch.device) -> None:
        if self.aroused is not None:
            self.aroused_total += int(self.aroused.sum())
        self.samples += batch
        self.aroused = torch.zeros(batch, dtype=torch.bool, device=device)

    def __call__(self, t: int, score: torch.Tensor, modules: dict) -> None:
        if t + 1 != self.policy.at and t + 1 not in self.policy.recheck:
            return
        new = (certainty(score, self.policy.test) < self.policy.threshold) & ~self.aroused
        if new.any():
            for name, m in modules.items():
                if self.policy.raises(name):
                    m.set_precision(new, self.value)
        self.aroused |= new

    def count(self) -> int:
        """Inputs aroused so far."""
        return self.aroused_total + (int(self.aroused.sum()) if self.aroused is not None else 0)

    def fraction(self) -> float:
        return self.count() / max(self.samples, 1)


def start_layers(control: PrecisionControl, policy: ArousalPolicy, layers: list[ProfileLayer]
                 ) -> list[ProfileLayer]:
    """The layers as an arousal run starts them (e.g. ASN at m_f = low)."""
    return [replace(layer, params={**layer.params, **control.start(policy)}) for layer in layers]
