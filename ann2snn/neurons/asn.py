"""Adaptive spiking neuron (ASN) of AdSNN: Zambrano, Nusselder, Scholte & Bohte 2019
(Front. Neurosci. 12:987; arXiv 1710.04838), update order and transfer function as in
docs/science.md section 1 and the public ``asn`` code.

One step, with decay factors d_x = exp(-1/tau_x), for input current c(t) (in units of S):

    S     = (1 - d_phi) c(t) + d_phi S               membrane filter
    Ŝ     = Ŝ d_eta                                    self-prediction decays
    s     = [S - Ŝ > theta / 2]                        spike test, previous threshold
    Ŝ    += s theta ;  theta_dyn += s m_f theta        on a spike
    theta_dyn *= d_gamma ;  theta = theta0 + theta_dyn  threshold adaptation
    psc   = psc d_beta + h s                           the layer's output (postsynaptic current)

(With tau_beta != tau_eta the PSC amplitude is h (1 - d_beta) / (1 - d_eta), which keeps the
PSC area and hence the mean output f(S); tau_beta = 0 emits plain spikes of that height.)

The next weighted layer computes W psc + b: the PSC filter commutes with W, so this is the
paper's I <- I d_beta + W x(t); the bias enters the membrane filter with the current (it
reaches its value within a few tau_phi). The mean output for a constant S is the transfer
function f(S) below, h chosen so that f(1) = 1. A layer fitted with scale lambda sees
S = c / lambda and emits lambda * psc, so lambda f(c / lambda) stands in for relu(c).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import torch

from ann2snn.errors import UserError
from ann2snn.neurons import compiled
from ann2snn.neurons.readout import Readout
from ann2snn.neurons.layer import SpikingLayer, TransferLayer, per_channel
from ann2snn.neurons.neuron import NON_NEGATIVE, PERCENTILE, Bound, Neuron, Precision, PrecisionControl, StepOps

if TYPE_CHECKING:
    from ann2snn.conversion.statistics import LayerStats

TAU = {"tau_phi": 2.5, "tau_gamma": 15.0, "tau_eta": 50.0, "tau_beta": 50.0}


class ASNParams(NamedTuple):
    m_f: float
    theta0: float
    h: float  # spike height with f(1) = 1 for a PSC of time constant tau_eta
    d_phi: float
    d_gamma: float
    d_eta: float
    d_beta: float
    h_out: float  # PSC amplitude: h (1 - d_beta) / (1 - d_eta) keeps the PSC area, so f(S), for any tau_beta
    tau_gamma: float = 15.0  # the time constants the closed form f(S) needs
    tau_eta: float = 50.0


class ASNState(NamedTuple):
    s: torch.Tensor
    s_hat: torch.Tensor
    theta_dyn: torch.Tensor
    theta: torch.Tensor
    psc: torch.Tensor


def decay(tau: float) -> float:
    """The factor d = exp(-1 / tau) a state decays by in one step (tau 0: none is kept)."""
    return math.exp(-1.0 / tau) if tau > 0 else 0.0


def make_params(m_f: float, theta0: float | None = None, tau_phi: float = 2.5, tau_gamma: float = 15.0,
                tau_eta: float = 50.0, tau_beta: float = 50.0) -> ASNParams:
    theta0 = m_f if theta0 is None else theta0
    h = normalised_h(m_f, theta0, tau_gamma, tau_eta)
    h_out = h * (1.0 - decay(tau_beta)) / (1.0 - decay(tau_eta))
    return ASNParams(m_f, theta0, h, decay(tau_phi), decay(tau_gamma), decay(tau_eta), decay(tau_beta), h_out,
                     tau_gamma, tau_eta)


def asn_init(current: torch.Tensor, p: ASNParams) -> ASNState:
    z = torch.zeros_like(current)
    return ASNState(z, z, z, torch.full_like(current, p.theta0), z)


def asn_step(current: torch.Tensor, state: ASNState, p: ASNParams) -> tuple[torch.Tensor, ASNState]:
    """Advance one time step (order of docs/science.md section 1); returns binary spikes and state."""
    s = (1.0 - p.d_phi) * current + p.d_phi * state.s
    s_hat = state.s_hat * p.d_eta
    spikes = (s - s_hat > 0.5 * state.theta).to(current.dtype)
    s_hat = s_hat + spikes * state.theta
    theta_dyn = (state.theta_dyn + spikes * p.m_f * state.theta) * p.d_gamma
    psc = state.psc * p.d_beta + p.h_out * spikes
    return spikes, ASNState(s, s_hat, theta_dyn, p.theta0 + theta_dyn, psc)


def onset_gain(t: int, onset: float) -> float:
    """The gain on a layer's input current at step index t: a linear ramp min(1, (t + 1) / R)
    over the first R = ``onset`` steps (0: none). In the first spiking layer every unit then
    rises in proportion to its final value, at a pace it can follow with at most one spike a
    step when R >= scale, so the onset sends far fewer transients that positive spikes cannot
    take back. With ``onset_layers`` "all" every layer applies it, so layer n sees about the n-th
    power of the ramp and its largest units lag behind near the ramp's end; with "input" only
    the layers the analog input reaches directly (``layer_onset``; docs/science.md section 8)."""
    return 1.0 if onset <= 0 or t + 1 >= onset else (t + 1) / onset


def ramp_steps(params: dict) -> int:
    """The steps of a layer's input ramp whose ``onset_gain`` is below 1 (each costs one more
    multiply per neuron, ``StepOps.mac_per_onset_step``): t + 1 < onset_ms, so ceil(onset_ms) - 1."""
    return max(0, math.ceil(float(params.get("onset_ms") or 0.0)) - 1)


def unused_ops(params: dict) -> tuple[float, float]:
    """The (multiplies, adds) per step that a layer's time constants leave out: with no membrane
    filter (tau_phi 0, so d_phi 0) S = (1 - d_phi) c + d_phi S is S = c, 2 multiplies and an add;
    with plain spikes for an output (tau_beta 0) psc = psc d_beta + h s is h s, 1 multiply."""
    unfiltered = decay(float(params.get("tau_phi", TAU["tau_phi"]))) == 0.0
    plain = decay(float(params.get("tau_beta", TAU["tau_beta"]))) == 0.0
    return 2.0 * unfiltered + 1.0 * plain, 1.0 * unfiltered


def rescaled_state(state: ASNState, mask: torch.Tensor, ratio: torch.Tensor, p: ASNParams) -> ASNState:
    """The state of the ``mask``ed samples carried across a change of m_f by ``ratio`` (arousal):
    the adaptive threshold, built of increments m_f theta, is scaled by ``ratio``, theta
    re-formed with the new theta0, and the prediction S_hat moved so that the spike test
    (S - S_hat) / theta keeps its value; otherwise a lower threshold meets an S - S_hat sized
    for the old one and the neuron bursts (docs/science.md section 1, arousal)."""
    theta_dyn = torch.where(mask, state.theta_dyn * ratio, state.theta_dyn)
    theta = p.theta0 + theta_dyn
    s_hat = torch.where(mask, state.s - (state.s - state.s_hat) * theta / state.theta, state.s_hat)
    return state._replace(s_hat=s_hat, theta_dyn=theta_dyn, theta=theta)


def _raw_transfer(S, m_f: float, theta0: float, tau_gamma: float, tau_eta: float):
    """f(S) / h of the closed form (docs/science.md section 1); S may be a float or a tensor."""
    c1 = 2 * m_f * tau_gamma ** 2
    c2 = 2 * theta0 * tau_eta * tau_gamma
    c3 = tau_gamma * (m_f * tau_gamma + 2 * (m_f + 1) * tau_eta)
    c4 = theta0 * tau_eta * (tau_gamma + tau_eta)
    c0 = 1.0 / math.expm1((c1 * theta0 / 2 + c2) / (c3 * theta0 / 2 + c4))
    if isinstance(S, torch.Tensor):
        Sp = S.clamp(min=theta0 / 2)
        val = 1.0 / torch.expm1((c1 * Sp + c2) / (c3 * Sp + c4)) - c0 + 0.5
        return torch.where(S > theta0 / 2, val, torch.zeros_like(val))
    if S <= theta0 / 2:
        return 0.0
    return 1.0 / math.expm1((c1 * S + c2) / (c3 * S + c4)) - c0 + 0.5


def normalised_h(m_f: float, theta0: float, tau_gamma: float = 15.0, tau_eta: float = 50.0) -> float:
    """Spike height with f(1) = 1 (f is linear in h)."""
    return 1.0 / _raw_transfer(1.0, m_f, theta0, tau_gamma, tau_eta)


def asn_transfer(S: torch.Tensor, p: ASNParams) -> torch.Tensor:
    """Analytic mean output f(S) for a constant activation S (0 for S <= theta0 / 2), with the
    parameters' own time constants."""
    return p.h * _raw_transfer(S, p.m_f, p.theta0, p.tau_gamma, p.tau_eta)


@torch.no_grad()
def measured_transfer(S: torch.Tensor, p: ASNParams, steps: int = 2000, burn_in: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulate one neuron per value of constant S; returns (decoded mean output
    h x rate x PSC area, with the PSC of tau_eta; spikes per step), measured after ``burn_in``."""
    state = asn_init(S, p)
    count = torch.zeros_like(S)
    for t in range(steps):
        spikes, state = asn_step(S, state, p)
        if t >= burn_in:
            count += spikes
    rate = count / (steps - burn_in)
    return p.h * rate / (1.0 - p.d_eta), rate


class TransferActivation(TransferLayer):
    """lambda f(x / lambda) as a differentiable activation (transfer-aware fine-tuning, and the
    report's "ANN with f"), f the simulated transfer function (``measured_f``): the closed form
    holds for theta0 = m_f and tau_beta = tau_eta = 50 ms, and is off by up to a third near the
    threshold for the sigma-delta settings (docs/science.md section 8)."""

    def __init__(self, p: ASNParams, scale: float | torch.Tensor = 1.0):
        super().__init__()
        self.p = p
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * measured_f(x / self.scale, self.p)


class ASNNeuron(SpikingLayer):
    """Stateful wrapper of ``asn_step`` for one layer: input divided by ``scale``, output (the PSC)
    multiplied by it; keeps the last step's binary spikes for accounting."""

    def __init__(self, m_f: float, scale: float | list = 1.0, theta0: float | None = None, onset: float = 0.0,
                 **taus: float):
        super().__init__()
        self.base = make_params(m_f, theta0, **taus)
        self.onset, self.t = float(onset), 0
        self.taus = taus
        self.p = self.base
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.backend = compiled.backend()

    def reset(self) -> None:
        super().reset()
        self.p, self.t = self.base, 0

    def set_precision(self, samples: torch.Tensor, m_f: float) -> None:
        """From the next step on, the ``samples`` (a boolean mask over the batch) run with
        adaptation speed ``m_f``: m_f, theta0 = m_f and h change together, so f stays
        normalised; the state carries on, rescaled by ``rescaled_state`` (arousal)."""
        state = self.running_state()
        mask = samples.view((-1,) + (1,) * (state.s.dim() - 1)).to(state.s.device)
        new = make_params(m_f, None, **self.taus)
        like = dict(dtype=state.s.dtype, device=mask.device)
        pick = {f: torch.where(mask, torch.as_tensor(getattr(new, f), **like), torch.as_tensor(getattr(self.p, f), **like))
                for f in ("m_f", "theta0", "h", "h_out")}
        old_m_f = torch.as_tensor(self.p.m_f, **like)
        self.p = self.p._replace(**pick)
        self.state = rescaled_state(state, mask, pick["m_f"] / old_m_f, self.p)

    def initial_state(self, current: torch.Tensor) -> ASNState:
        return asn_init(current, self.p)  # zeros and theta0, shaped like the (scaled) input

    def step(self, current: torch.Tensor) -> torch.Tensor:
        scale = per_channel(self.scale, current)
        x = current * (onset_gain(self.t, self.onset) / scale)
        self.t += 1
        self.spikes, self.state = compiled.run(self.backend, asn_step, x, self.state, self.p)
        return self.state.psc * scale


S_MAX = 64.0  # a numeric scale maps the percentile activation to S = scale (up to 48 among the candidates)


@lru_cache(maxsize=64)
def _measured_table(p: ASNParams) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.linspace(0.0, S_MAX, 2561, dtype=torch.float64)
    return grid, measured_transfer(grid, p, steps=3000, burn_in=300)[0]


def measured_f(S: torch.Tensor, p: ASNParams) -> torch.Tensor:
    """The simulated transfer function (it includes the 1 kHz cap and coarse coding at low S),
    interpolated on a grid of constant inputs; saturates beyond the grid."""
    grid, table = (t.to(S.device) for t in _measured_table(p))
    x = S.double().clamp(0, S_MAX)
    idx = torch.searchsorted(grid, x.detach()).clamp(1, len(grid) - 1)
    x0, x1, y0, y1 = grid[idx - 1], grid[idx], table[idx - 1], table[idx]
    return (y0 + (x - x0) / (x1 - x0) * (y1 - y0)).to(S.dtype)  # differentiable in S between grid points


def fit_scale(sample: torch.Tensor, p: ASNParams, reference: float) -> float:
    """The layer scale lambda minimising E[(a - lambda f(a / lambda))^2] over the calibration
    activations a (zeros cost nothing either way), f being the measured transfer function;
    searched on a log grid from reference/8 to reference*4."""
    if sample.numel() == 0 or reference <= 0:
        return reference if reference > 0 else 1.0
    a = sample.double()
    best, best_loss = reference, math.inf
    for k in range(-24, 17):
        lam = reference * 2.0 ** (k / 8)
        loss = float(((a - lam * measured_f(a / lam, p)) ** 2).mean())
        if loss < best_loss:
            best, best_loss = lam, loss
    return best


def _params(options: dict) -> ASNParams:
    return make_params(float(options["m_f"]), options.get("theta0"),
                       **{k: float(options[k]) for k in TAU})


def layer_onset(options: dict, analog_input: bool | None) -> float:
    """A layer's onset ramp in steps: ``onset_ms`` in every layer (``onset_layers`` "all"), or
    only in the layers the network's analog input reaches through no other spiking layer
    ("input", ``graph.analog_fed``): the layers above receive currents that already ramp, and
    ramping them again compounds to (t/R)^n and delays the output by about R steps
    (docs/science.md section 8)."""
    onset = float(options.get("onset_ms", 0.0))
    if options.get("onset_layers", "all") == "all" or onset == 0:
        return onset
    if analog_input is None:
        raise UserError("onset_layers=input: the profile does not record which layers the analog input reaches "
                        "(it was written by an older release); calibrate again")
    return onset if analog_input else 0.0


def retune(params: dict, options: dict, analog_input: bool | None) -> dict:
    """The layer's parameters with its onset following changed options, the fit kept (sweeps)."""
    return {**params, "onset_ms": layer_onset(options, analog_input)}


def fit(stats: "LayerStats", options: dict) -> dict:
    """Per-layer ASN parameters: the options, the onset (``layer_onset``) and the scale lambda
    (fitted, or set so that the layer's percentile activation maps to S = ``scale`` when ``scale``
    is a number)."""
    p = _params(options)
    ref = stats.percentile if stats.percentile > 0 else max(stats.max, 1e-6)
    if options["scale"] == "fit":
        scale = fit_scale(stats.sample, p, ref)
    else:
        scale = ref / float(options["scale"])
    return {"m_f": p.m_f, "theta0": options.get("theta0"), **{k: float(options[k]) for k in TAU},
            "onset_ms": layer_onset(options, stats.analog_input), "scale": float(scale)}


def build(params: dict) -> ASNNeuron:
    return ASNNeuron(params["m_f"], params["scale"], params.get("theta0"), params.get("onset_ms", 0.0),
                     **{k: params[k] for k in TAU if k in params})


def readout(options: dict) -> Readout:
    """The non-spiking output layer is filtered with ``readout_tau`` (ms; 0: unfiltered) and its
    sum read from ``start_ms`` on. The reference code filters with 50 ms and reads from 200 ms;
    the defaults here (0 and 0) read as IF does, and were measured to settle sooner (README)."""
    tau = float(options.get("readout_tau", 0.0))
    return Readout(tau=tau if tau > 0 else None, start=int(options.get("start_ms", 0)))


def transfer_module(params: dict) -> TransferActivation:
    """The differentiable stand-in used by transfer-aware fine-tuning."""
    p = make_params(params["m_f"], params.get("theta0"), **{k: params[k] for k in TAU if k in params})
    return TransferActivation(p, params["scale"])


DEFAULTS = {"m_f": 0.1, "theta0": None, **TAU, "onset_ms": 0.0, "onset_layers": "all", "readout_tau": 0.0, "start_ms": 0, "percentile": 99.9,
            "scale": "fit", "bias_ramp": True}

# What calibrate tries when the user names none of these options (operating_point.py): the
# paper's equations with faster threshold decay (a wider linear range of f, docs/science.md section
# 6) and m_f 0.3; then the sigma-delta limit (section 8): next to no adaptation,
# a fixed threshold theta0 = 1 and a slow leak, so that a constant input's code costs almost no
# spikes once sent. There the layer scale sets the precision - ``scale`` k maps the layer's
# percentile activation to k threshold steps, as IF after k steps - and the input ramps up over
# onset_ms = k steps (``onset_gain``), so that few onset transients are sent that positive spikes
# cannot take back: coarse steps suit a short horizon, fine ones a long one. The ramp acts in
# every layer (fewer transients in the layers above, a later output) or only in the layers the
# analog input feeds (an output as early as IF's; section 8 measures both)
_PAPER = {"theta0": None, "tau_eta": TAU["tau_eta"], "tau_beta": TAU["tau_beta"], "scale": "fit", "onset_ms": 0.0,
          "onset_layers": "all"}
_SIGMA_DELTA = {"m_f": 0.01, "tau_gamma": 2.0, "theta0": 1.0, "tau_eta": 1000.0, "tau_beta": 1000.0}
OPERATING_POINTS = tuple(
    [{"m_f": 0.3, "tau_gamma": 2.0, **_PAPER}]
    + [{**_SIGMA_DELTA, "scale": k, "onset_ms": k, "onset_layers": "all"} for k in (8.0, 12.0, 16.0, 24.0, 32.0, 48.0)]
    + [{**_SIGMA_DELTA, "scale": k, "onset_ms": k, "onset_layers": "input"} for k in (16.0, 24.0, 32.0)])


def conflict(options: dict, named: set) -> str | None:
    """A named ``onset_layers`` places the ``onset_ms`` ramp: without one it would do nothing (and,
    named at calibrate, it still turns off calibrate's own choice)."""
    ramp = float(options.get("onset_ms") or 0)
    if "onset_layers" in named and options.get("onset_layers") == "input" and not ramp > 0:
        return ("onset_layers=input places the onset_ms ramp, and onset_ms is 0 here: nothing would ramp "
                "(set onset_ms too)")
    return None


def _where(policy) -> str:
    return f" in {'+'.join(policy.layers)}" if policy.layers else ""


AROUSAL = PrecisionControl(
    value=lambda policy: policy.high,
    mechanism="ASN precision per input: m_f, theta0 and h switched together",
    # theta0 follows m_f (None), as set_precision switches it: a fixed theta0 (the sigma-delta
    # candidates) is not arousal's knob
    start=lambda policy: {"m_f": policy.low, "theta0": None},
    raised=lambda params, policy: {**params, "m_f": policy.high, "theta0": None},
    raised_options=lambda options, policy: {**options, "m_f": policy.high, "theta0": None},
    start_label=lambda policy: f"ASN m_f={policy.low:g}",
    raised_label=lambda policy: f"ASN m_f={policy.high:g}{_where(policy)}",
    start_text=lambda policy: f"run at m_f {policy.low:g}",
    switch_text=lambda policy, which: f"switch {which} to m_f {policy.high:g}",
    between=lambda params, policy, f: {**params, "m_f": policy.low ** (1 - f) * policy.high ** f, "theta0": None},
    between_label=lambda params, policy, f: f"ASN m_f={policy.low ** (1 - f) * policy.high ** f:.4g}",
)

NEURON = Neuron(
    name="asn", defaults=DEFAULTS, fit=fit, build=build, readout=readout,
    precision=Precision("m_f", (0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6)),
    default_timesteps=200, readout_options=("readout_tau", "start_ms"),
    transfer_module=transfer_module, precision_control=AROUSAL,
    # theta0 (= m_f unless set) below 2: f(1) > 0 needs the firing threshold theta0 / 2 below S = 1
    bounds={"m_f": Bound(0, 2, lo_open=True, hi_open=True), "theta0": Bound(1e-6, 2, hi_open=True, none=True),
            "tau_phi": Bound(0, 1e6), "tau_gamma": Bound(0.1, 1e6), "tau_eta": Bound(0.1, 1e6),
            "tau_beta": Bound(0, 1e6), "onset_ms": Bound(0, 1e6), "onset_layers": Bound(words=("all", "input")),
            "readout_tau": NON_NEGATIVE, "start_ms": Bound(0, integer=True), "percentile": PERCENTILE,
            "scale": Bound(0, lo_open=True, words=("fit",)), "bias_ramp": Bound(flag=True)},
    # bias ramps (bias_ramp.py) are fitted by calibrate: a sweep cannot switch them
    calibration_only=("percentile", "bias_ramp"),
    # onset_ms and onset_layers set each layer's onset through retune (which layers ramp follows the graph)
    param_options=("m_f", "theta0", *TAU, "onset_ms", "onset_layers"), retune=retune, retuned=("onset_ms", "onset_layers"),
    # per step: S filter 2 mul + add, S_hat decay, theta/2, theta_dyn decay, theta0 + theta_dyn, PSC
    # decay: 6 multiplies, 4 adds and the compare (less what tau_phi or tau_beta 0 leave out,
    # unused_ops); per spike: S_hat += theta, theta_dyn += m_f theta (2 adds, the multiply counted as
    # an add of a precomputed m_f theta), PSC += h; during the onset ramp one more multiply (the input's gain)
    step_ops=StepOps(mac_per_step=6, add_per_step=4, add_per_spike=3, mac_per_onset_step=1,
                     onset_steps=ramp_steps, unused=unused_ops),
    operating_points=OPERATING_POINTS, conflict=conflict,
)
