"""Variable spiking neuron (VSN): Garg & Chakraborty, arXiv 2311.09267; equations as restated
in docs/science.md section 2. One step, for input z(t):

    M(t) = beta M(t-1) + z(t)          memory, M(0) = 0
    s(t) = H(M(t) - T)                 spike test against the threshold T
    y(t) = sigma(z(t) s(t))            graded spike: it carries the value z(t)
    M(t) = 0 where s(t) = 1            reset

sigma is the activation the layer replaces: ReLU (identity on the positive values that pass
the gate), GELU or SiLU; the gate z >= T >= 0 drops their small negative part (the calibration
reports its share of the output energy). Thresholds are stored in output units (the fit works on
the ANN's activations) and turned into input units by inverting sigma on z > 0. The spike is
graded, so each synaptic event downstream is a multiply-accumulate. With Ts time steps the
input is repeated and the output averaged (the readout sums the output). At Ts = 1,
y = z [z >= T]: exactly ReLU outside (0, T), 0 inside; T = 0 reproduces the ReLU layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn.neurons import compiled
from ann2snn.neurons.readout import Readout
from ann2snn.neurons.layer import SpikingLayer, TransferLayer, per_channel
from ann2snn.neurons.neuron import NON_NEGATIVE, PERCENTILE, Bound, Neuron, Precision, PrecisionControl, StepOps

if TYPE_CHECKING:
    from ann2snn.conversion.statistics import LayerStats


SIGMAS = {"relu": lambda z: z.clamp(min=0), "gelu": F.gelu, "silu": F.silu,
          "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}


def input_threshold(threshold: torch.Tensor, sigma: str) -> torch.Tensor:
    """The z at which sigma(z) reaches ``threshold`` (>= 0) on z > 0, where every sigma here is
    increasing (bisection; identity for ReLU)."""
    if sigma == "relu":
        return threshold
    f = SIGMAS[sigma]
    lo, hi = torch.zeros_like(threshold), 2 * threshold + 1  # sigma(z) >= z / 2 - 0.3 on z > 0
    for _ in range(60):
        mid = (lo + hi) / 2
        below = f(mid) < threshold
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.where(threshold > 0, hi, torch.zeros_like(threshold))


class VSNParams(NamedTuple):
    beta: float
    threshold: torch.Tensor  # scalar or per channel, in input units
    sigma: str = "relu"


class VSNState(NamedTuple):
    m: torch.Tensor


def vsn_init(z: torch.Tensor) -> VSNState:
    return VSNState(torch.zeros_like(z))


def vsn_step(z: torch.Tensor, state: VSNState, p: VSNParams) -> tuple[torch.Tensor, torch.Tensor, VSNState]:
    """Advance one step; returns (events: spikes that carry a non-zero value, output y, state)."""
    m = p.beta * state.m + z
    fired = m >= p.threshold
    y = torch.where(fired & (z > 0), SIGMAS[p.sigma](z), torch.zeros_like(z))
    return (y > 0).to(z.dtype), y, VSNState(torch.where(fired, torch.zeros_like(m), m))


def vsn_transfer_one_step(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Output at Ts = 1: relu(z) [z >= T]."""
    return torch.where(z >= threshold, z.clamp(min=0), torch.zeros_like(z))


class FastSigmoidStep(torch.autograd.Function):
    """H(x) forward; backward the fast-sigmoid surrogate dH/dx ~ 1 / (1 + k|x|)^2 (k = 25 as is
    usual for VSNs, docs/science.md section 2; Zenke & Ganguli 2018)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.k = k
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad / (1.0 + ctx.k * x.abs()) ** 2, None


def vsn_surrogate_one_step(z: torch.Tensor, threshold: torch.Tensor, k: float = 25.0,
                           sigma: str = "relu") -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Ts = 1 VSN: (sigma(z) H(sigma(z) - T) [z > 0], H), H's gradient the fast
    sigmoid, T in output units; its forward value is the VSN's at one step (for ReLU:
    ``vsn_transfer_one_step``). Fine-tuning trains this one-step behaviour (the usual VSN
    setting); with Ts > 1 the memory and beta are not trained."""
    a = SIGMAS[sigma](z)
    spikes = FastSigmoidStep.apply(a - threshold, k) * (z > 0)
    return a * spikes, spikes


class SurrogateVSN(TransferLayer):
    """A Ts = 1 VSN layer for surrogate-gradient fine-tuning: thresholds (per channel or one)
    are trained with the weights, kept >= 0; ``spikes`` holds the last batch's spike count per
    sample (differentiable, for a spike penalty)."""

    counts_spikes = True

    def __init__(self, threshold: float | list, k: float = 25.0, sigma: str = "relu"):
        super().__init__()
        self.threshold = nn.Parameter(torch.as_tensor(threshold, dtype=torch.float32))
        self.k, self.sigma = k, sigma
        self.spikes: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        t = self.threshold + (self.threshold.clamp(min=0) - self.threshold).detach()  # >= 0, gradient kept at 0
        y, s = vsn_surrogate_one_step(z, per_channel(t, z), self.k, self.sigma)
        self.spikes = s.flatten(1).sum(1).mean()  # events: spikes that carry a non-zero value
        return y

    def learnt(self) -> list[nn.Parameter]:
        return [self.threshold]

    def trained_params(self, params: dict) -> dict:
        t = self.threshold.detach().clamp(min=0).cpu()
        return {**params, "threshold": t.tolist() if t.dim() else float(t)}


class VSNNeuron(SpikingLayer):
    """Stateful wrapper of ``vsn_step``; keeps the last step's events for accounting (graded, as
    ``Neuron.spike_op`` says: an average pool after the layer pools them before they travel,
    ``energy.pooled_sources``)."""

    def __init__(self, threshold: float | list, beta: float = 0.9, sigma: str = "relu"):
        super().__init__()
        self.sigma = sigma  # threshold: in output units, as stored in profiles; the test uses input units
        self.register_buffer("threshold",
                             input_threshold(torch.as_tensor(threshold, dtype=torch.float32), sigma))
        self.beta = float(beta)
        self.factor: torch.Tensor | None = None  # per-sample threshold factor set by arousal
        self.backend = compiled.backend()

    def reset(self) -> None:
        super().reset()
        self.factor = None

    def set_precision(self, samples: torch.Tensor, scale: float) -> None:
        """From the next step on, the ``samples`` (a boolean mask over the batch) fire against
        thresholds x ``scale`` (arousal: a lower threshold lets smaller values through, more
        precise and more spikes); other samples and every memory carry on unchanged."""
        state = self.running_state()
        mask = samples.view((-1,) + (1,) * (state.m.dim() - 1)).to(state.m.device)
        base = self.factor if self.factor is not None else torch.ones(mask.shape, dtype=state.m.dtype,
                                                                      device=mask.device)
        self.factor = torch.where(mask, torch.full_like(base, float(scale)), base)

    def initial_state(self, z: torch.Tensor) -> VSNState:
        return vsn_init(z)

    def step(self, z: torch.Tensor) -> torch.Tensor:
        t = per_channel(self.threshold, z)
        if self.factor is not None:
            t = t * self.factor
        self.spikes, y, self.state = compiled.run(self.backend, vsn_step, z, self.state, VSNParams(self.beta, t, self.sigma))
        return y


DEFAULTS = {"beta": 0.9, "threshold": 0.0, "tradeoff": None, "per_channel": True, "percentile": 99.9}


def fit_threshold(sample: torch.Tensor, positive_fraction: float, neurons: float, tradeoff: float,
                  reference: float | None = None) -> float:
    """T minimising  E[z^2 1(0 < z < T)] / reference + tradeoff x neurons x P(z >= T) / 1000:
    added error relative to ``reference`` (default: this sample's E[z^2 1(z > 0)]) plus the
    spikes per step (in thousands) of ``neurons`` units priced by the trade-off; exact over
    every value of the calibration sample of positive activations."""
    if sample.numel() == 0 or tradeoff <= 0:
        return 0.0
    z = sample.double().sort().values
    n = z.numel()
    energy = torch.cumsum(z * z, 0) * positive_fraction / n  # E[z^2 1(0 < z <= z_k)]
    below = torch.cat([torch.zeros(1, dtype=z.dtype), energy[:-1]])  # added error with T = z[k]
    rel_err = below / max(reference if reference is not None else float(energy[-1]), 1e-30)
    activity = positive_fraction * (n - torch.arange(n, dtype=z.dtype)) / n
    k = int(torch.argmin(rel_err + tradeoff * neurons * activity / 1000.0))
    return float(z[k]) if k > 0 else 0.0


def _channel_samples(stats: "LayerStats") -> list[tuple[torch.Tensor, float]]:
    """(positive values, positive fraction) per channel, from the calibration activations or,
    when re-fitting from a profile, from its per-channel quantile tables."""
    if stats.channel_values is not None:
        return [(c[c > 0], float((c > 0).float().mean())) for c in stats.channel_values]
    return [(torch.tensor(q, dtype=torch.float32), f)
            for q, f in zip(stats.channel_quantiles or [], stats.channel_positive_fraction or [])]


def fit(stats: "LayerStats", options: dict) -> dict:
    """Per-layer threshold: ``threshold`` as given, or fitted for ``tradeoff`` (set by --budget),
    one per channel when ``per_channel`` (each channel's error counted against the layer's)."""
    beta = float(options["beta"])
    if options.get("tradeoff") is None:
        threshold = float(options["threshold"])
        return {"threshold": threshold, "beta": beta, **_sigma(stats)}
    tradeoff = float(options["tradeoff"])
    channels = _channel_samples(stats) if options.get("per_channel", True) else []
    if len(channels) > 1:
        layer_energy = sum(float((v.double() ** 2).sum()) * f / max(v.numel(), 1) for v, f in channels)
        per_unit = int(stats.neurons) / len(channels)
        thresholds = [fit_threshold(v, f, per_unit, tradeoff, layer_energy) for v, f in channels]
        return {"threshold": thresholds, "beta": beta, **_sigma(stats)}
    threshold = fit_threshold(stats.sample, stats.sample_positive_fraction, int(stats.neurons), tradeoff)
    return {"threshold": threshold, "beta": beta, **_sigma(stats)}


def _sigma(stats: "LayerStats") -> dict:
    """The activation the layer replaces, recorded when it is not ReLU (thresholds in its output units)."""
    act = stats.activation
    return {} if act == "relu" else {"sigma": act}


def build(params: dict) -> VSNNeuron:
    return VSNNeuron(params["threshold"], params.get("beta", DEFAULTS["beta"]), params.get("sigma", "relu"))


def transfer_module(params: dict) -> SurrogateVSN:
    """The trainable stand-in used by ``ann2snn finetune`` (surrogate gradients, Ts = 1)."""
    return SurrogateVSN(params["threshold"], sigma=params.get("sigma", "relu"))


def readout(options: dict) -> Readout:
    """The output summed (averaged) over the Ts steps."""
    return Readout(tau=None, start=int(options.get("start_ms", 0)))


def _scaled(threshold: float | list, scale: float) -> float | list:
    return [t * scale for t in threshold] if isinstance(threshold, list) else threshold * scale


def _where(policy) -> str:
    return f" in {'+'.join(policy.layers)}" if policy.layers else ""


AROUSAL = PrecisionControl(
    value=lambda policy: policy.threshold_scale,
    mechanism="VSN thresholds per input: multiplied by threshold_scale",
    start=lambda policy: {},
    raised=lambda params, policy: {**params, "threshold": _scaled(params["threshold"], policy.threshold_scale)},
    raised_options=lambda options, policy: options,
    start_label=lambda policy: "VSN calibrated thresholds",
    raised_label=lambda policy: f"VSN thresholds x {policy.threshold_scale:g}{_where(policy)}",
    start_text=lambda policy: "run at the calibrated thresholds",
    switch_text=lambda policy, which: f"fire against thresholds x {policy.threshold_scale:g} in {which}",
    between=lambda params, policy, f: {**params, "threshold": _scaled(params["threshold"],
                                                                      1 - f * (1 - policy.threshold_scale))},
    between_label=lambda params, policy, f: f"VSN thresholds x {1 - f * (1 - policy.threshold_scale):.4g}",
)

NEURON = Neuron(
    name="vsn", defaults=DEFAULTS, fit=fit, build=build, readout=readout,
    activations=tuple(SIGMAS), spike_op="mac", default_timesteps=1,
    precision=Precision("tradeoff", (0.0, *(round(10 ** (k / 4), 6) for k in range(-20, 13)))),
    transfer_module=transfer_module, precision_control=AROUSAL,
    bounds={"beta": Bound(0, 1, hi_open=True), "threshold": NON_NEGATIVE, "tradeoff": Bound(0, none=True),
            "per_channel": Bound(flag=True), "percentile": PERCENTILE, "sigma": Bound(words=tuple(SIGMAS))},
    param_options=("beta",),
    step_ops=StepOps(mac_per_step=1, add_per_step=1, add_per_spike=0),  # M = beta M + z; M >= T; reset
)
