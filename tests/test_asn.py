import math

import pytest
import torch

from ann2snn.errors import UserError
from ann2snn.neurons import asn
from ann2snn.evaluation.report import describe_policy


def test_h_normalisation_matches_published_values():
    for m_f, h in ((0.03, 0.0385), (0.1, 0.1244), (0.2, 0.2393), (0.45, 0.4976), (0.6, 0.6402)):
        assert round(asn.normalised_h(m_f, m_f), 4) == h
    p = asn.make_params(0.1)
    f = asn.asn_transfer(torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0]), p)
    assert torch.allclose(f, torch.tensor([0.300, 0.564, 1.0, 1.628, 2.370]), atol=1e-3)
    assert asn.asn_transfer(torch.tensor([0.05, 0.0, -1.0]), p).abs().sum() == 0  # dead zone S <= theta0/2


def test_step_matches_a_hand_computed_trace():
    m_f, S = 0.1, 1.0
    d_phi, d_eta, d_gamma, d_beta = (math.exp(-1 / t) for t in (2.5, 50, 15, 50))
    h = asn.normalised_h(m_f, m_f)
    s = s_hat = theta_dyn = psc = 0.0
    theta = m_f
    expected = []
    for _ in range(6):  # science.md section 1, steps 1-6, written out with plain floats
        s = (1 - d_phi) * S + d_phi * s
        s_hat *= d_eta
        spike = 1.0 if s - s_hat > 0.5 * theta else 0.0
        s_hat += spike * theta
        theta_dyn = (theta_dyn + spike * m_f * theta) * d_gamma
        theta = m_f + theta_dyn
        psc = psc * d_beta + h * spike
        expected.append((spike, s, s_hat, theta, psc))
    p = asn.make_params(m_f)
    x = torch.tensor([S], dtype=torch.float64)
    state = asn.asn_init(x, p)
    for spike, s, s_hat, theta, psc in expected:
        out, state = asn.asn_step(x, state, p)
        assert float(out) == spike
        got = (float(state.s), float(state.s_hat), float(state.theta), float(state.psc))
        assert got == pytest.approx((s, s_hat, theta, psc), rel=1e-12)
    assert [e[0] for e in expected][:2] == [1.0, 1.0]  # the onset burst


@pytest.mark.parametrize("m_f,lo,hi", [(0.1, 0.2, 4.0), (0.03, 0.2, 2.0), (0.3, 1.0, 4.0)])
def test_simulation_matches_the_transfer_function(m_f, lo, hi):
    p = asn.make_params(m_f)
    S = torch.linspace(lo, hi, 12, dtype=torch.float64)
    decoded, _ = asn.measured_transfer(S, p, steps=2000, burn_in=200)
    err = (decoded / asn.asn_transfer(S, p) - 1).abs()
    assert err.max() < 0.02, err


@pytest.mark.parametrize("taus", [{"tau_gamma": 10.0, "tau_eta": 30.0, "tau_beta": 30.0},
                                  {"tau_gamma": 25.0, "tau_eta": 50.0, "tau_beta": 50.0}])
def test_the_closed_form_follows_other_time_constants(taus):
    """f(S) uses the parameters' tau_gamma and tau_eta (it used 15 and 50 whatever they were)."""
    p = asn.make_params(0.1, **taus)
    S = torch.linspace(0.3, 3.0, 10, dtype=torch.float64)
    decoded, _ = asn.measured_transfer(S, p, steps=3000, burn_in=400)
    err = (decoded / asn.asn_transfer(S, p) - 1).abs()
    assert err.max() < 0.02, err  # with tau_gamma 15 and tau_eta 50 in the formula: 4% and 24% off


def test_module_scale_is_an_exact_change_of_units():
    torch.manual_seed(0)
    c = torch.rand(3, 4, 5, 5) * 3
    a, b = asn.ASNNeuron(0.2, scale=2.5), asn.ASNNeuron(0.2, scale=1.0)
    for _ in range(20):
        out_a, out_b = a(c), b(c / 2.5)
        assert torch.equal(a.spikes, b.spikes)
        assert torch.allclose(out_a, 2.5 * out_b)
    per_channel = asn.ASNNeuron(0.2, scale=[1.0, 2.0, 3.0, 4.0])
    per_channel(c)
    assert per_channel.spikes.shape == c.shape


def test_fitted_scale_beats_the_percentile_mapping():
    torch.manual_seed(0)
    a = torch.relu(torch.randn(50_000)) * 2
    p = asn.make_params(0.1)
    ref = float(a.quantile(0.999))
    lam = asn.fit_scale(a, p, ref)
    loss = lambda s: float(((a - s * asn.measured_f(a / s, p)) ** 2).mean())  # noqa: E731
    # an independent, finer search that shares no point with the fit's grid (ref * 2^(k/8))
    dense = [ref * 2.0 ** ((k + 0.37) / 40) for k in range(-120, 80)]
    best = min(dense, key=loss)
    assert loss(lam) <= 1.02 * loss(best)  # the fit finds the optimum to within its grid
    assert abs(math.log2(lam / best)) <= 1 / 8 + 1 / 40
    assert loss(lam) < 0.05 * float((a ** 2).mean()) and loss(lam) < 0.9 * loss(ref)


def test_arousal_switches_only_the_aroused_sample():
    torch.manual_seed(0)
    c = torch.rand(1, 3, 4, 4).repeat(2, 1, 1, 1) * 2  # two identical inputs
    both = asn.ASNNeuron(0.3)
    spikes = []
    for t in range(30):
        if t == 10:
            both.set_precision(torch.tensor([True, False]), 0.1)
        both(c)
        spikes.append(both.spikes.clone())
    spikes = torch.stack(spikes)
    alone_low = asn.ASNNeuron(0.3)  # sample 1 by itself, never aroused
    low = torch.stack([(alone_low(c[1:]), alone_low.spikes.clone())[1] for _ in range(30)])
    assert torch.equal(spikes[:, 1:], low)
    switched = asn.ASNNeuron(0.3)  # sample 0 by itself, precision raised at step 10
    ref = []
    for t in range(30):
        if t == 10:
            old = switched.p
            switched.p = asn.make_params(0.1)
            switched.state = asn.rescaled_state(switched.state, torch.ones(1, 1, 1, 1, dtype=torch.bool),
                                                torch.tensor(0.1 / old.m_f), switched.p)
        switched(c[:1])
        ref.append(switched.spikes.clone())
    assert torch.equal(spikes[:, :1], torch.stack(ref))
    assert torch.equal(spikes[:10, 0], spikes[:10, 1]) and not torch.equal(spikes[10:, 0], spikes[10:, 1])
    both.reset()
    assert both.p == both.base


def test_the_state_rescaled_at_the_switch_leaves_no_burst():
    """500 neurons with constant inputs switch from m_f 0.3 to 0.1 at step 60. Swapping the
    parameters alone leaves S - S_hat sized for the old threshold: a burst at the switch.
    Rescaled, they fire at once as a network run at m_f 0.1 throughout does."""
    torch.manual_seed(0)
    c = torch.rand(1, 500) * 2

    def spikes_per_step(rescale: bool) -> list[float]:
        n, out = asn.ASNNeuron(0.3), []
        for t in range(80):
            if t == 60 and rescale:
                n.set_precision(torch.tensor([True]), 0.1)
            elif t == 60:
                n.p = n.p._replace(**{f: getattr(asn.make_params(0.1), f) for f in ("m_f", "theta0", "h", "h_out")})
            n(c)
            out.append(float(n.spikes.sum()))
        return out

    high = asn.ASNNeuron(0.1)
    steady = [float((high(c), high.spikes.sum())[1]) for _ in range(120)][100:]
    level = sum(steady) / len(steady)
    plain, rescaled = spikes_per_step(False)[60:], spikes_per_step(True)[60:]
    assert max(plain) > 2 * level  # the burst
    assert max(rescaled) < 1.5 * max(steady) and sum(rescaled) / len(rescaled) > 0.8 * level


def test_arousal_of_named_layers_leaves_the_others_at_low_precision():
    from ann2snn.sim.arousal import ArousalController
    from ann2snn.neurons.arousal_policy import ArousalPolicy

    policy = ArousalPolicy.parse("low=0.3,high=0.1,at=3,threshold=0.5,layers=act1")
    assert policy.layers == ("act1",) and "ASN layers act1" in describe_policy(policy, asn.NEURON)
    layers = {"act0": asn.ASNNeuron(0.3), "act1": asn.ASNNeuron(0.3)}
    control = ArousalController(policy, asn.NEURON.precision_control)
    control.reset(2, torch.device("cpu"))
    for m in layers.values():
        m(torch.ones(2, 4))
    score = torch.tensor([[5.0, 0.0], [1.0, 1.0]])  # sample 0 certain, sample 1 uncertain
    control(2, score, layers)  # after step 3
    assert control.aroused.tolist() == [False, True]
    high = asn.make_params(0.1)
    assert layers["act1"].p.m_f.flatten().tolist() == pytest.approx([0.3, 0.1])
    assert layers["act1"].p.h.flatten()[1].item() == pytest.approx(high.h)
    assert layers["act0"].p == layers["act0"].base  # not named: unchanged for both samples
    with pytest.raises(UserError, match="act7 is not a spiking layer"):
        ArousalPolicy.parse("layers=act7").check_layers(["act0", "act1"])


def test_arousal_tests_margin_or_ratio_of_the_top_two_softmax_scores():
    from ann2snn.sim.arousal import ArousalController, certainty
    from ann2snn.neurons.arousal_policy import ArousalPolicy

    # softmax of log-probabilities gives back p: sample 0 has p1 = 0.6, p2 = 0.3 (margin 0.3,
    # ratio 1 - 0.5 = 0.5); sample 1 has p1 = 0.5, p2 = 0.45 (margin 0.05, ratio 0.1).
    score = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.45, 0.05]]).log()
    assert certainty(score, "margin").tolist() == pytest.approx([0.3, 0.05], abs=1e-6)
    assert certainty(score, "ratio").tolist() == pytest.approx([0.5, 0.1], abs=1e-6)
    aroused = {}
    for test in ("margin", "ratio"):
        control = ArousalController(ArousalPolicy.parse(f"at=1,threshold=0.4,test={test}"),
                                    asn.NEURON.precision_control)
        control.reset(2, torch.device("cpu"))
        neuron = asn.ASNNeuron(0.3)
        neuron(torch.ones(2, 4))
        control(0, score, {"act0": neuron})
        aroused[test] = control.aroused.tolist()
    assert aroused == {"margin": [True, True], "ratio": [False, True]}
    assert "1 - top-2 / top-1" in describe_policy(ArousalPolicy.parse("test=ratio"), asn.NEURON)
    with pytest.raises(UserError, match="the test is one of margin, ratio"):
        ArousalPolicy.parse("test=entropy")


def test_the_policy_reads_one_list_syntax_and_the_older_one():
    from ann2snn.neurons.arousal_policy import ArousalPolicy

    new = ArousalPolicy.parse("low=0.45;high=0.1;at=10;recheck=20,30;layers=act0,act1;test=ratio")
    old = ArousalPolicy.parse("low=0.45,high=0.1,at=10,recheck=20+30,layers=act0+act1,test=ratio")
    assert new == old and new.recheck == (20, 30) and new.layers == ("act0", "act1")


def test_one_list_field_alone_reads_in_the_new_syntax():
    from ann2snn.neurons.arousal_policy import ArousalPolicy

    assert ArousalPolicy.parse("layers=act2,act3").layers == ("act2", "act3")
    assert ArousalPolicy.parse("recheck=60,90").recheck == (60, 90)


@pytest.mark.parametrize("options", [dict(m_f=0.3, tau_gamma=2.0),
                                     dict(m_f=0.01, theta0=0.5, tau_gamma=2.0, tau_eta=100.0, tau_beta=100.0)])
def test_the_transfer_activation_is_the_simulated_neuron_and_has_a_gradient(options):
    """Fine-tuning and the report's "ANN with f" use the simulated f, which the closed form
    misses by about a third near the threshold of a sigma-delta setting (theta0 fixed, slow leak)."""
    p = asn.make_params(**options)
    S = torch.tensor([0.3, 0.45, 0.7, 1.0, 2.0, 3.0], dtype=torch.float64)
    simulated = asn.measured_transfer(S, p, steps=3000, burn_in=300)[0]
    x = (2.0 * S).float().requires_grad_()
    y = asn.TransferActivation(p, scale=2.0)(x)
    assert torch.allclose(y.detach().double(), 2.0 * simulated, rtol=0.02, atol=1e-3)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad > 0).all()
    if "theta0" in options:  # where the closed form does not hold: the stand-in would be 40% off at S = 0.3
        assert float(asn.asn_transfer(S[:1], p)) > 1.3 * float(simulated[0])


def test_arousal_switches_theta0_with_m_f_even_from_a_fixed_threshold():
    from ann2snn.neurons.arousal_policy import ArousalPolicy
    control, policy = asn.NEURON.precision_control, ArousalPolicy(low=0.3, high=0.1)
    params = {"m_f": 0.01, "theta0": 0.5, "tau_eta": 100.0, "scale": 1.0}
    assert control.start(policy) == {"m_f": 0.3, "theta0": None}
    assert control.raised(params, policy) == {**params, "m_f": 0.1, "theta0": None}
    assert control.between(params, policy, 1.0)["theta0"] is None


def test_every_operating_point_names_the_same_options_and_is_valid():
    keys = set(asn.OPERATING_POINTS[0])
    assert {"m_f", "tau_gamma", "theta0", "tau_eta", "tau_beta", "scale", "onset_ms", "onset_layers"} == keys
    for candidate in asn.OPERATING_POINTS:
        assert set(candidate) == keys
        asn.NEURON.options(candidate)  # within the option bounds


def test_onset_layers_input_ramps_only_the_layers_the_analog_input_feeds():
    from torch import nn

    from ann2snn.conversion.statistics import LayerStats
    from ann2snn.conversion.graph import analog_fed, normalize, spiking_layers

    class Residual(nn.Module):  # a stem, then a block whose add sums the stem's spikes and a conv of them
        def __init__(self):
            super().__init__()
            self.stem, self.conv, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(8, 2)
            self.side = nn.Conv2d(1, 2, 3, padding=1)  # a second layer fed by the image alone
            self.skip = nn.Conv2d(1, 2, 3, padding=1)  # a skip connection from the image into a deeper layer

        def forward(self, x):
            a = torch.relu(self.stem(x))
            b = torch.relu(self.conv(a) + a)
            c = torch.relu(self.side(x))
            d = torch.relu(self.conv(b) + self.skip(x))
            return self.head(torch.flatten(nn.functional.avg_pool2d(b + c + d, 2), 1))

    gm, _ = normalize(Residual())
    layers = spiking_layers(gm)
    # the image reaches the stem, the side layer and (by the skip) the last one through no spiking layer
    assert len(layers) == 4 and analog_fed(gm) == {layers[0], layers[2], layers[3]}
    stats = lambda analog: LayerStats(neurons=4, max=2.0, percentile=1.0, analog_input=analog)  # noqa: E731
    options = asn.NEURON.options({"m_f": 0.01, "theta0": 1.0, "scale": 16, "onset_ms": 16.0, "onset_layers": "input"})
    assert asn.fit(stats(True), options)["onset_ms"] == 16.0
    assert asn.fit(stats(False), options)["onset_ms"] == 0.0
    assert asn.fit(stats(False), {**options, "onset_layers": "all"})["onset_ms"] == 16.0
    with pytest.raises(UserError, match="onset_layers=input.*calibrate again"):  # a profile from before the flag
        asn.fit(stats(None), options)
    assert asn.fit(stats(None), {**options, "onset_layers": "all"})["onset_ms"] == 16.0
    with pytest.raises(UserError, match="onset_layers=first"):
        asn.NEURON.options({"onset_layers": "first"})
    # a named "input" places the onset_ms ramp: with none (the default 0) it would do nothing, so it is
    # refused, over the defaults or over an artifact's options (a sweep); onset_ms 0 named on its own is
    # a network without a ramp, and a file holding the pair is loaded as the network it is
    with pytest.raises(UserError, match="onset_layers=input places the onset_ms ramp, and onset_ms is 0 here"):
        asn.NEURON.options({"onset_layers": "input"})
    with pytest.raises(UserError, match="onset_layers=input places"):
        asn.NEURON.options({"onset_layers": "input"}, over={"onset_ms": 0.0, "onset_layers": "all"})
    assert asn.NEURON.options({"onset_layers": "input"}, over={"onset_ms": 8.0})["onset_ms"] == 8.0
    assert asn.NEURON.options({"onset_ms": 0.0}, over={"onset_ms": 8.0, "onset_layers": "input"})["onset_ms"] == 0.0
    asn.NEURON.check_options({"onset_layers": "input", "onset_ms": 0.0}, "p.json")


def test_onset_gain_ramps_linearly_to_one():
    assert [asn.onset_gain(t, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert asn.onset_gain(0, 0) == 1.0 and asn.onset_gain(2, 2.5) == 1.0


def test_onset_ramp_sends_every_unit_in_proportion_to_its_value():
    # sigma-delta units (m_f ~ 0, theta0 1, slow leak) at constant inputs S from 0.5 to 16 thresholds: with
    # the input ramped over R = 16 steps, each has sent round(S t / R) thresholds at step t (within one);
    # without it the units near 16 are still rate-limited (one spike a step) when the small ones are done
    S = torch.linspace(0.5, 16.0, 32)
    taus = {"tau_phi": 0.0, "tau_gamma": 2.0, "tau_eta": 1e6, "tau_beta": 1e6}

    def sent(onset: float, steps: int) -> torch.Tensor:
        neuron = asn.ASNNeuron(0.001, 1.0, 1.0, onset, **taus)
        count = torch.zeros_like(S)
        for _ in range(steps):
            neuron(S)
            count += neuron.spikes
        return count

    for t in (4, 8, 12):
        assert ((sent(16.0, t) - S * t / 16).abs() <= 1.0).all(), t
    assert ((sent(16.0, 40) - S).abs() <= 1.0).all()  # and the whole value once the ramp is over
    early = sent(0.0, 8)  # without the ramp, at step 8: the small units are sent in full, the large capped at 8
    assert (early[S > 8] == 8).all() and (early[S < 4] - S[S < 4]).abs().max() <= 1.0
