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
``arousal_runs`` lays out the three simulations ``evaluate --arousal`` makes: under arousal control,
fixed low and fixed high precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .errors import OptionError
from .options import parse_number
from .simulate import Run

if TYPE_CHECKING:
    from .neurons import Neuron, PrecisionControl
    from .profile import NeuronSpec, ProfileLayer


TESTS = ("margin", "ratio")


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


@dataclass(frozen=True)
class ArousalPolicy:
    low: float = 0.3  # m_f everyone starts with
    high: float = 0.1  # m_f of aroused inputs
    at: int = 40  # decision step (1 step = 1 ms)
    recheck: tuple[int, ...] = field(default_factory=tuple)
    threshold: float = 0.5  # arouse when the certainty (``test``) is below this
    test: str = "margin"  # certainty of the readout: margin or ratio (see ``certainty``)
    threshold_scale: float = 0.0  # VSN (Ts > 1): aroused inputs fire against thresholds x this
    layers: tuple[str, ...] = ()  # spiking layers whose precision arousal raises; () = all

    def __post_init__(self):
        if not (0 < self.high < 2 and 0 < self.low < 2 and self.at >= 1 and 0 <= self.threshold <= 1
                and 0 <= self.threshold_scale <= 1):
            raise ValueError("needs 0 < high, low < 2, at >= 1, 0 <= threshold <= 1, 0 <= threshold_scale <= 1")
        if self.test not in TESTS:
            raise ValueError(f"the test is one of {', '.join(TESTS)}")

    @classmethod
    def parse(cls, text: str, base: "ArousalPolicy | None" = None) -> "ArousalPolicy":
        """``low=0.3;high=0.1;at=40;threshold=0.5;test=ratio;recheck=80,120;layers=act2,act3``:
        fields separated by ';' and list items by ',', as everywhere in the CLI (``--normalize
        'MEAN;STD'``, ``--sweep m_f=0.1,0.2``); without a ';' the older form with ',' between
        fields and '+' in lists (``recheck=80+120``) is read when every ','-part is a KEY=VALUE. Keys not given come from ``base``
        (e.g. the policy a budget search stored in the artifact), then the defaults."""
        values: dict = asdict(base) if base is not None else {}
        old = ";" not in text and all("=" in part for part in text.split(",") if part.strip())
        fields, items = (",", "+") if old else (";", ",")
        for item in filter(None, (f.strip() for f in text.split(fields))):
            key, sep, value = item.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise OptionError("arousal_policy", f"{item!r}: expected KEY=VALUE with KEY one of "
                                f"{', '.join(cls.__dataclass_fields__)}")
            if key == "layers":
                values[key] = tuple(filter(None, value.split(items)))
                continue
            if key == "test":
                if value not in TESTS:
                    raise OptionError("arousal_policy", f"{item!r}: the test is one of {', '.join(TESTS)}")
                values[key] = value
                continue
            number = lambda v: parse_number(v, "arousal_policy", key in ("at", "recheck"), item)  # noqa: E731
            values[key] = tuple(map(number, value.split(items))) if key == "recheck" else number(value)
        try:
            return cls(**values)
        except ValueError as exc:
            raise OptionError("arousal_policy", f"{text!r}: {exc}") from None

    def check_layers(self, names: list[str]) -> None:
        unknown = [n for n in self.layers if n not in names]
        if unknown:
            raise OptionError("arousal_policy", f"layers: {unknown[0]} is not a spiking layer of this network "
                            f"(layers: {', '.join(names)})")

    def raises(self, layer: str) -> bool:
        """Whether arousal changes the precision of ``layer``."""
        return not self.layers or layer in self.layers

    def describe(self, neuron: "Neuron") -> str:
        """One sentence for the report; ``neuron`` must have ``precision_control``."""
        checks = ", ".join(str(t) for t in (self.at, *self.recheck))
        which = f"{neuron.label} layers {', '.join(self.layers)}" if self.layers else f"every {neuron.label} layer"
        control = neuron.precision_control
        measure = "top-1 minus top-2 softmax readout score" if self.test == "margin" else \
            "1 - top-2 / top-1 softmax readout score"
        return (f"{control.start_text(self)}; at step(s) {checks}, inputs whose {measure} is below "
                f"{self.threshold:g} {control.switch_text(self, which)}")


class ArousalController:
    """Called by the simulator after every step with the readout score (see ``simulate``)."""

    def __init__(self, policy: ArousalPolicy, control: "PrecisionControl"):
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
                if hasattr(m, "set_precision") and self.policy.raises(name):
                    m.set_precision(new, self.value)
        self.aroused |= new

    def count(self) -> int:
        """Inputs aroused so far."""
        return self.aroused_total + (int(self.aroused.sum()) if self.aroused is not None else 0)

    def fraction(self) -> float:
        return self.count() / max(self.samples, 1)


def matched_run(neuron: "Neuron", policy: ArousalPolicy, spec: "NeuronSpec", layers: list["ProfileLayer"],
                fraction: float) -> Run:
    """A fixed-precision run ``fraction`` of the way from the start precision to the raised one
    in the layers arousal raises (``PrecisionControl.between``)."""
    control = neuron.precision_control
    moved = [replace(layer, params=control.between(layer.params, policy, fraction)) if policy.raises(layer.name)
             else layer for layer in layers]
    label = control.between_label(layers[0].params, policy, fraction) + " (spikes as arousal)"
    return Run(label, neuron, spec, moved, spike_matched=True)


def start_layers(control: "PrecisionControl", policy: ArousalPolicy, layers: list["ProfileLayer"]
                 ) -> list["ProfileLayer"]:
    """The layers as an arousal run starts them (e.g. ASN at m_f = low)."""
    return [replace(layer, params={**layer.params, **control.start(policy)}) for layer in layers]


def arousal_runs(neuron: "Neuron", policy: ArousalPolicy, spec: "NeuronSpec", layers: list["ProfileLayer"]
                 ) -> list[Run]:
    """The three runs of ``evaluate --arousal``, from the network at its start precision (``spec``,
    ``layers``; ``artifact.variant`` with ``control.start(policy)``; the neuron must have
    ``precision_control``): under arousal control, fixed
    at the start precision, and fixed at the raised precision in the layers arousal raises."""
    control = neuron.precision_control
    raised = [replace(layer, params=control.raised(layer.params, policy)) if policy.raises(layer.name) else layer
              for layer in layers]
    raised_spec = spec if policy.layers else replace(spec, options=control.raised_options(spec.options, policy))
    return [Run(f"{neuron.label} arousal", neuron, spec, layers, ArousalController(policy, control)),
            Run(control.start_label(policy), neuron, spec, layers),
            Run(control.raised_label(policy), neuron, raised_spec, raised)]
