from dataclasses import replace

import pytest
import torch
from torch import nn

from ann2snn.conversion.graph import normalize, spiking_layers, to_snn
from ann2snn.io.data import TensorData
from ann2snn.sim.energy import ann_macs, fanout_maps
from ann2snn.neurons.if_neuron import IFNeuron
from ann2snn.neurons import asn
from ann2snn.neurons import if_neuron
from ann2snn.store.profile import NeuronSpec, ProfileLayer
from ann2snn.neurons.readout import Readout
from ann2snn.evaluation.report import build_report, context, within_margin
from ann2snn.evaluation.plan import Run
from ann2snn.sim.simulate import simulate

from conftest import tiny_cnn


def _hand_network():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        model[2].bias.zero_()
    gm, _ = normalize(model)
    return gm, to_snn(gm, {"act0": IFNeuron(threshold=1.0, v_init=0.5)})


def test_spike_accounting_on_a_hand_computed_case():
    # currents 0.3 and 0.55, theta 1, v0 0.5:
    #   unit 0: v = 0.8, 1.1*, 0.4, 0.7      -> spike at step 2
    #   unit 1: v = 1.05*, 0.6, 1.15*, 0.7   -> spikes at steps 1 and 3
    gm, snn = _hand_network()
    data = TensorData("hand", "file", torch.tensor([[0.3, 0.55]] * 3), torch.zeros(3, dtype=torch.long), 1)
    fan = fanout_maps(gm, (2,))
    assert fan["act0"].tolist() == [1.0, 1.0]  # each hidden unit drives one output synapse
    assert fan["input"].tolist() == [1.0, 1.0]  # identity weights: one real connection each
    sim = simulate(snn, ["act0"], fan, data, timesteps=4, batch_size=2, device=torch.device("cpu"))
    assert sim.spikes[0].tolist() == [3.0, 3.0, 3.0, 0.0]  # three samples, one spike per step
    assert sim.synops[0].tolist() == [3.0, 3.0, 3.0, 0.0]
    ctx = context(gm, data, fan, ["act0"], {"act0": "0"}, "hand", "cpu", "45nm-fp32")
    ctx.ann["accuracy"] = 1.0
    run = Run("IF", if_neuron.NEURON, NeuronSpec(type="if", options={}), [])
    report = build_report(sim, run, Readout(), ctx)
    assert report.snn["spikes_per_sample"] == 3.0
    assert report.snn["synops_per_sample"] == 3.0
    assert report.snn["firing_rate_hz"] == 3.0 / 2 / 4 * 1000
    assert report.ann["macs_per_sample"] == 4 == ann_macs(gm, (2,))
    assert report.snn["synaptic_energy_pj_per_sample"] == 3 * 0.9 + 2 * 4.6
    # 2 neurons x 4 steps x (v += I, v >= theta) + 3 spikes x (v -= theta), each an add at 0.9 pJ
    assert report.snn["neuron_updates_per_sample"] == {"mac": 0, "add": 2 * 4 * 2 + 3}
    assert report.snn["neuron_energy_pj_per_sample"] == pytest.approx(19 * 0.9)
    assert report.snn["energy_pj_per_sample"] == pytest.approx(3 * 0.9 + 2 * 4.6 + 19 * 0.9)
    assert [c["spikes_per_sample"] for c in report.curve] == [1.0, 2.0, 3.0, 3.0]
    # the energy by each step: synaptic events and neuron updates so far, the constant input once
    by_step = [2 * 4.6 + spent * 0.9 + (2 * t * 2 + spent) * 0.9 for t, spent in zip(range(1, 5), (1, 2, 3, 3))]
    assert [c["energy_pj_per_sample"] for c in report.curve] == pytest.approx(by_step)
    assert report.curve[-1]["energy_pj_per_sample"] == pytest.approx(report.snn["energy_pj_per_sample"])
    curve = [dict(c, accuracy=a) for c, a in zip(report.curve, (0.5, 0.999, 0.99, 0.998))]
    w = within_margin(curve, 1.0, 0.3)  # within 0.3 points at steps 2 and 4: stays within from step 4
    assert (w["first"], w["settled"], w["settled_spikes"]) == (2, 4, 3.0)
    assert w["settled_energy_pj"] == report.curve[3]["energy_pj_per_sample"]
    assert report.layers[0].firing_rate_hz == 375.0 and report.layers[0].source == "0"
    # the same counts read as ASN's: 6 multiplies a step, and one more on each step of a layer's input
    # ramp (the steps whose gain min(1, t / onset_ms) is below 1; a ramp longer than the run: all its
    # steps), counted from the layer's own onset_ms (with onset_layers=input, 0 above the input layers)
    for onset, ramp_steps in ((0, 0), (3, 2), (2.5, 2), (10, 4)):
        layer = ProfileLayer(name="act0", neurons=2, params={"onset_ms": onset})
        asn_run = Run("ASN", asn.NEURON, NeuronSpec(type="asn", options={"onset_ms": onset}), [layer])
        updates = build_report(sim, asn_run, Readout(), ctx).snn["neuron_updates_per_sample"]
        assert updates == {"mac": 2 * (4 * 6 + ramp_steps), "add": 2 * 4 * 4 + 3 * 3}, onset
    # by step t the ramp has cost min(t, ramp steps) multiplies per unit: onset 3 ramps steps 1 and 2
    layer = ProfileLayer(name="act0", neurons=2, params={"onset_ms": 3.0})
    curve = build_report(sim, Run("ASN", asn.NEURON, NeuronSpec(type="asn", options={}), [layer]), Readout(), ctx).curve
    for t, spent in zip(range(1, 5), (1, 2, 3, 3)):
        mac, add = 2 * (t * 6 + min(t, 2)), 2 * t * 4 + spent * 3
        assert curve[t - 1]["energy_pj_per_sample"] == pytest.approx(2 * 4.6 + spent * 0.9 + mac * 4.6 + add * 0.9)
    unramped = ProfileLayer(name="act0", neurons=2, params={"onset_ms": 0.0})  # a layer the ramp skips
    asn_run = Run("ASN", asn.NEURON, NeuronSpec(type="asn", options={"onset_ms": 3.0}), [unramped])
    assert build_report(sim, asn_run, Readout(), ctx).snn["neuron_updates_per_sample"]["mac"] == 2 * 4 * 6
    # a layer without a membrane filter (tau_phi 0: S = c) does 2 multiplies and an add fewer a step,
    # one with plain output spikes (tau_beta 0: psc = h s) a multiply fewer; a filtered one (its
    # tau_phi, or the default 2.5 where the parameters name none) does not
    for params, mac, add in (({"tau_phi": 0.0}, 4, 3), ({"tau_phi": 2.5}, 6, 4), ({}, 6, 4),
                             ({"tau_beta": 0.0}, 5, 4), ({"tau_phi": 1e-4, "tau_beta": 0.0}, 3, 3)):
        layer = ProfileLayer(name="act0", neurons=2, params={"onset_ms": 0.0, **params})
        asn_run = Run("ASN", asn.NEURON, NeuronSpec(type="asn", options={}), [layer])
        updates = build_report(sim, asn_run, Readout(), ctx).snn["neuron_updates_per_sample"]
        assert updates == {"mac": 2 * 4 * mac, "add": 2 * 4 * add + 3 * 3}, params
    # counted layer by layer: beside act0 (2 units, filtered) a silent act1 of 3 units without a filter
    two = replace(ctx, units={"act0": 2, "act1": 3})
    layers = [ProfileLayer(name="act0", neurons=2, params={"onset_ms": 0.0}),
              ProfileLayer(name="act1", neurons=3, params={"onset_ms": 0.0, "tau_phi": 0.0})]
    report = build_report(sim, Run("ASN", asn.NEURON, NeuronSpec(type="asn", options={}), layers), Readout(), two)
    assert report.snn["neuron_updates_per_sample"] == {"mac": 4 * (2 * 6 + 3 * 4), "add": 4 * (2 * 4 + 3 * 3) + 3 * 3}
    for t, spent in zip(range(1, 5), (1, 2, 3, 3)):
        mac, add = t * (2 * 6 + 3 * 4), t * (2 * 4 + 3 * 3) + spent * 3
        assert report.curve[t - 1]["energy_pj_per_sample"] == pytest.approx(2 * 4.6 + spent * 0.9 + mac * 4.6 + add * 0.9)


def test_fanout_through_pooling_matches_brute_force_jacobian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
    with torch.no_grad():
        model[3].weight[0, 1, 0, 0] = 0.0  # a zero weight is no synapse
    gm, _ = normalize(model)
    fan = fanout_maps(gm, (1, 6, 6))

    def downstream(s):  # spikes of act0 -> currents of the next weighted layer, weights as 0/1
        conv = model[3]
        return nn.functional.conv2d(nn.functional.avg_pool2d(s, 2), (conv.weight != 0).float(), None, 1, 1)

    jac = torch.autograd.functional.jacobian(downstream, torch.zeros(1, 2, 6, 6)).reshape(3 * 3 * 3, 2 * 6 * 6)
    brute = (jac != 0).sum(0).float().view(2, 6, 6)
    assert torch.equal(fan["act0"], brute)
    assert torch.equal(fan["act1"], torch.full((3, 3, 3), 4.0))  # every unit feeds 4 outputs of the Linear


def test_snn_approaches_ann_with_time():
    gm, _ = normalize(tiny_cnn())
    layers = spiking_layers(gm)
    snn = to_snn(gm, {name: IFNeuron(threshold=1.5) for name in layers})
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = gm(x).argmax(1)
    data = TensorData("t", "file", x, y, 3)
    sim = simulate(snn, layers, fanout_maps(gm, (1, 8, 8)), data, 200, 16, torch.device("cpu"))
    assert sim.metric[-1] >= 36  # at least 90% agreement with the ANN after 200 steps
    assert sim.metric[-1] >= sim.metric[4]


def test_static_split_is_the_same_network():
    from ann2snn.neurons.asn import ASNNeuron
    from ann2snn.sim.simulate import split_static

    gm, _ = normalize(tiny_cnn())
    layers = spiking_layers(gm)
    x = torch.rand(5, 1, 8, 8)
    for make in (lambda: IFNeuron(1.0), lambda: ASNNeuron(0.2, scale=0.5)):
        full, split = to_snn(gm, {n: make() for n in layers}), to_snn(gm, {n: make() for n in layers})
        static, step = split_static(split)
        assert sum(1 for n in static.graph.nodes if n.op == "call_module") == 1  # the first conv only
        constant = static(x)
        with torch.no_grad():
            for _ in range(12):
                assert torch.equal(full(x), step(*constant))


class _ResidualPool(nn.Module):
    """Max pool after a ReLU, a residual add that meets the static input current, avg pool."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(1, 4, 1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a) + self.c3(x))  # c3(x) is static: it meets time-varying values
        return self.fc(torch.flatten(self.pool(b), 1))


def _engines_agree(snn_of, gm, data, timesteps, **kwargs):
    layers = spiking_layers(gm)
    fan = fanout_maps(gm, data.sample_shape)
    runs = [simulate(snn_of(), layers, fan, data, timesteps, 7, torch.device("cpu"), engine=e, **kwargs)
            for e in ("steps", "layers")]
    for a, b in zip(runs, runs[1:]):
        assert torch.equal(a.metric, b.metric) and torch.equal(a.spikes, b.spikes) and torch.equal(a.synops, b.synops)
    return runs[0]


def test_layered_engine_equals_the_step_by_step_reference():
    from ann2snn.neurons.asn import ASNNeuron
    from ann2snn.neurons.vsn import VSNNeuron
    from ann2snn.neurons.readout import Readout

    torch.manual_seed(0)
    gm, _ = normalize(_ResidualPool().eval())
    x = torch.rand(20, 1, 8, 8)
    data = TensorData("t", "file", x, gm(x).argmax(1), 3)
    layers = spiking_layers(gm)
    for make, readout in ((lambda: IFNeuron(0.5), Readout()), (lambda: ASNNeuron(0.2, scale=0.5), Readout(50.0, 5)),
                          (lambda: VSNNeuron(0.1), Readout())):
        sim = _engines_agree(lambda: to_snn(gm, {n: make() for n in layers}), gm, data, 23, readout=readout,
                             memory_budget=20_000)  # a few steps per chunk: state crosses chunk borders
        assert sim.spikes.sum() > 0
    # plain max pooling on spikes too
    _engines_agree(lambda: to_snn(gm, {n: IFNeuron(0.5) for n in layers}, maxpool="spikes"), gm, data, 9)


def test_arousal_runs_the_same_in_both_engines():
    from ann2snn.sim.arousal import ArousalController
    from ann2snn.neurons.arousal_policy import ArousalPolicy
    from ann2snn.neurons.asn import NEURON, ASNNeuron

    gm, _ = normalize(tiny_cnn())
    x = torch.rand(16, 1, 8, 8)
    data = TensorData("t", "file", x, gm(x).argmax(1), 3)
    layers = spiking_layers(gm)
    policy = ArousalPolicy(low=0.3, high=0.1, at=6, threshold=0.9, recheck=(11,))
    fan = fanout_maps(gm, data.sample_shape)
    runs, fractions = [], []
    for engine in ("steps", "layers"):
        control = ArousalController(policy, NEURON.precision_control)
        snn = to_snn(gm, {n: ASNNeuron(0.3, scale=0.5) for n in layers})
        runs.append(simulate(snn, layers, fan, data, 20, 5, torch.device("cpu"), controller=control, engine=engine))
        fractions.append(control.fraction())
    assert torch.equal(runs[0].spikes, runs[1].spikes) and torch.equal(runs[0].metric, runs[1].metric)
    assert fractions[0] == fractions[1] > 0


def test_a_batch_that_runs_out_of_memory_is_retried_in_halves(monkeypatch):
    import ann2snn.sim.engine

    gm, _ = normalize(tiny_cnn())
    x = torch.rand(12, 1, 8, 8)
    data = TensorData("t", "file", x, gm(x).argmax(1), 3)
    layers = spiking_layers(gm)
    fan = fanout_maps(gm, data.sample_shape)
    reference = simulate(to_snn(gm, {n: IFNeuron(0.5) for n in layers}), layers, fan, data, 10, 12,
                         torch.device("cpu"))
    original = ann2snn.sim.engine.TimeScan.forward
    seen = []

    def forward(self, x):  # as if the device could hold only 6 samples
        seen.append(self.batch)
        if self.batch > 6:
            raise torch.OutOfMemoryError("out of memory")
        return original(self, x)

    monkeypatch.setattr(ann2snn.sim.engine.TimeScan, "forward", forward)
    sim = simulate(to_snn(gm, {n: IFNeuron(0.5) for n in layers}), layers, fan, data, 10, 12, torch.device("cpu"))
    assert 12 in seen and max(b for b in seen if b <= 6) == 6
    assert torch.equal(sim.spikes, reference.spikes) and torch.equal(sim.metric, reference.metric)


def test_cuda_fused_engine_equals_the_unfused_one_and_agrees_with_the_cpu():
    """On CUDA the Triton IF kernel must reproduce the PyTorch scan bit for bit; against the CPU
    only up to rounding, since cuDNN sums convolutions in another order (a current at threshold
    can flip a spike)."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gm, _ = normalize(_ResidualPool().eval())
    x = torch.rand(40, 1, 8, 8)
    data = TensorData("t", "file", x, gm(x).argmax(1), 3)
    layers = spiking_layers(gm)
    fan = fanout_maps(gm, data.sample_shape)
    run = lambda dev, **kw: simulate(to_snn(gm, {n: IFNeuron(0.5) for n in layers}), layers, fan, data, 30, 16,  # noqa
                                     torch.device(dev), **kw)
    fused, unfused, cpu = run("cuda"), run("cuda", fused=False), run("cpu", engine="steps")
    assert torch.equal(fused.spikes, unfused.spikes) and torch.equal(fused.metric, unfused.metric)
    assert torch.equal(fused.synops, unfused.synops)
    assert abs(float(fused.spikes.sum() / cpu.spikes.sum()) - 1) < 0.01
    assert (fused.metric[-1] - cpu.metric[-1]).abs() <= 2


def test_intervals_and_paired_tests_match_hand_computed_values():
    import math

    from ann2snn.evaluation.stats import mcnemar, wilson

    lo, hi = wilson(95, 100)  # Wilson 1927: p = 0.95, n = 100, z = 1.96
    assert lo == pytest.approx(0.8882, abs=1e-4) and hi == pytest.approx(0.9785, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and 0.27 < wilson(0, 10)[1] < 0.28
    a = torch.tensor([1] * 20 + [0] * 5 + [1] * 75, dtype=torch.float64)  # 20 right only in a, 5 only in b
    b = torch.tensor([0] * 20 + [1] * 5 + [1] * 75, dtype=torch.float64)
    test = mcnemar(a, b)
    exact = 2 * sum(math.comb(25, i) for i in range(6)) / 2 ** 25  # two-sided exact binomial
    assert (test["only_this_right"], test["only_other_right"]) == (20, 5)
    assert test["p_value"] == pytest.approx(exact, rel=1e-9) and test["significant"]
    assert mcnemar(a, a)["p_value"] == 1.0 and not mcnemar(a, a)["significant"]


def test_an_ann_that_skips_zeros_counts_only_connections_with_a_nonzero_input():
    from torch import nn

    from ann2snn.sim.energy import ann_active_macs, ann_macs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(torch.tensor([1.0, -10.0, 1.0, -10.0]))  # two hidden units stay at zero
        model[2].weight[0, 0] = 0.0  # one connection that does not exist
    gm, _ = normalize(model)
    x = torch.tensor([[1.0, 0.0, 2.0]])
    # layer 1: 2 nonzero inputs x 4 outputs = 8; layer 2: 2 nonzero hidden units x 2 outputs, less the
    # missing connection from unit 0 = 3
    assert ann_active_macs(gm, [(x, None)], torch.device("cpu")) == 8 + 3
    assert ann_macs(gm, (3,)) == 12 + 7


def test_engines_agree_on_deep_networks_and_on_pooled_graded_events():
    from ann2snn.neurons.vsn import VSNNeuron
    from ann2snn.io.zoo import resolve_model
    from conftest import tiny_cnn

    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    for name in ("vgg16_bn", "resnet18"):  # small random variants: residual sums, max pools, 14-17 layers
        gm, _ = normalize(resolve_model(name, {"width": 4}).eval())
        layers = spiking_layers(gm)
        data = TensorData("t", "file", x, gm(x).argmax(1), 10)
        sim = _engines_agree(lambda: to_snn(gm, {n: IFNeuron(0.05) for n in layers}), gm, data, 7,
                             memory_budget=200_000)
        assert sim.spikes[-1].sum() > 0  # activity reaches the last spiking layer
    gm, _ = normalize(tiny_cnn())
    layers = spiking_layers(gm)
    xs = torch.rand(20, 1, 8, 8)
    data = TensorData("t", "file", xs, gm(xs).argmax(1), 3)
    runs = [simulate(to_snn(gm, {n: VSNNeuron(0.05) for n in layers}), layers,
                     fanout_maps(gm, data.sample_shape, graded=True), data, 5, 7, torch.device("cpu"), engine=e,
                     memory_budget=20_000, graded=True) for e in ("steps", "layers")]
    assert torch.equal(runs[0].synops, runs[1].synops) and torch.equal(runs[0].spikes, runs[1].spikes)


def test_constant_chunk_rows_meet_time_varying_ones():
    """Values constant over a chunk travel as B rows: an operation of several inputs repeats them
    for the chunk's K steps (lists of tensors too), and leaves them as they are when all match."""
    from ann2snn.sim.engine import MatchRows
    const, varying = torch.arange(8.0).view(2, 4), torch.rand(6, 4)
    cat = MatchRows(torch.cat, (0, 1), {"dim": 1})
    cat.steps, cat.batch = 3, 2
    assert torch.equal(cat([const, varying]), torch.cat([const.repeat(3, 1), varying], dim=1))
    add = MatchRows(torch.add, (0, 1), {})
    add.steps, add.batch = 3, 2
    assert torch.equal(add(const, varying), const.repeat(3, 1) + varying)
    assert torch.equal(add(const, const), 2 * const)  # both constant: still B rows


def test_a_chunks_constant_keeps_its_channels_last_layout_when_repeated():
    from ann2snn.sim.engine import time_rows
    x = torch.rand(3, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    rows = time_rows(x, 2, 3)
    assert rows.is_contiguous(memory_format=torch.channels_last) and torch.equal(rows, torch.cat([x, x]))


def test_chunks_end_at_every_decision_and_take_the_size_of_their_segment():
    from ann2snn.sim.simulate import _chunks
    size = lambda a, b: 4 if a >= 10 else 3  # noqa: E731  (a segment from step 10 on allows longer chunks)
    chunks = _chunks(20, size, [10, 13])
    assert chunks == [(0, 3), (3, 3), (6, 3), (9, 1), (10, 3), (13, 4), (17, 3)]


def test_channels_last_images_give_the_contiguous_simulations_counts():
    """On the CPU the images go channels last; the convolutions' sums may round differently, so
    compare counts within a spike or two, and the layers see the same images."""
    from conftest import tiny_labelled
    gm, data = tiny_labelled(16, 3)
    layers = spiking_layers(gm)
    snn = to_snn(gm, {n: if_neuron.build({"threshold": 1.0}) for n in layers})
    fan = fanout_maps(gm, data.sample_shape)
    runs = [simulate(snn, layers, fan, data, 12, 8, torch.device("cpu"), channels_last=last) for last in (False, True)]
    assert runs[0].spikes.sum() > 0
    assert (runs[0].spikes - runs[1].spikes).abs().max() <= 2 and torch.equal(runs[0].metric, runs[1].metric)
