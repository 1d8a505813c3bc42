import json
import math

import torch

from ann2snn.conversion.graph import normalize, spiking_layers, to_snn
from ann2snn.neurons import vsn

from conftest import tiny_cnn


def test_one_step_vsn_with_zero_threshold_is_the_relu_network():
    gm, _ = normalize(tiny_cnn())
    snn = to_snn(gm, {name: vsn.VSNNeuron(0.0) for name in spiking_layers(gm)})
    x = torch.rand(16, 1, 8, 8) - 0.3
    with torch.no_grad():
        assert torch.equal(snn(x), gm(x))


def test_one_step_output_and_events():
    m = vsn.VSNNeuron(threshold=0.5, beta=0.9)
    z = torch.tensor([[-1.0, 0.0, 0.2, 0.5, 2.0]])
    assert torch.equal(m(z), torch.tensor([[0.0, 0.0, 0.0, 0.5, 2.0]]))
    assert torch.equal(m.spikes, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]]))
    assert torch.equal(vsn.vsn_transfer_one_step(z, torch.tensor(0.5)), m(z) * 0 + torch.tensor([[0.0, 0.0, 0.0, 0.5, 2.0]]))


def _closed_form(z: float, T: float, beta: float, steps: int) -> float:
    """Mean output over ``steps`` for constant z (science.md section 2): every step if z >= T,
    never if z <= T (1 - beta), else once every k steps, k the first with z (1-beta^k)/(1-beta) >= T."""
    if z >= T:
        return z
    if z <= T * (1 - beta):
        return 0.0
    k = math.ceil(math.log(1 - T * (1 - beta) / z) / math.log(beta))
    return z * (steps // k) / steps


def test_multi_step_output_matches_the_closed_form():
    T, beta, steps = 1.0, 0.9, 12
    z = torch.linspace(0.02, 1.5, 150, dtype=torch.float64)
    m = vsn.VSNNeuron(T, beta)
    total = sum(m(z.view(1, -1)) for _ in range(steps))
    expected = torch.tensor([_closed_form(float(v), T, beta, steps) for v in z], dtype=torch.float64)
    assert torch.allclose(total.view(-1) / steps, expected, atol=1e-6)


def test_threshold_fit_trades_error_for_spikes():
    torch.manual_seed(0)
    sample = torch.relu(torch.randn(20_000)) + 1e-3
    sample = sample[sample > 0]
    t = [vsn.fit_threshold(sample, 0.5, 1000, tr) for tr in (0.0, 0.01, 0.1, 1.0)]
    assert t[0] == 0.0 and t == sorted(t) and t[-1] > t[1]
    z = sample.double()
    for tradeoff, T in zip((0.01, 0.1, 1.0), t[1:]):  # the fit is the exact argmin of its objective
        objective = lambda x: float((z ** 2 * (z < x)).sum() / (z ** 2).sum()) * 0.5 / 0.5 \
            + tradeoff * 1000 * 0.5 * float((z >= x).double().mean()) / 1000  # noqa: E731
        candidates = z.sort().values[::97].tolist() + [T]
        assert objective(T) <= min(objective(x) for x in candidates) + 1e-12
        assert objective(T) < objective(0.0) and objective(T) < objective(float(z.max()) + 1)


def test_surrogate_layer_computes_the_one_step_vsn_and_trains_its_thresholds():
    torch.manual_seed(0)
    z = torch.randn(8, 3, 4, 4)
    layer = vsn.SurrogateVSN([0.2, 0.5, 0.0])
    y = layer(z)
    t = torch.tensor([0.2, 0.5, 0.0]).view(1, 3, 1, 1)
    assert torch.equal(y, vsn.vsn_transfer_one_step(z, t))
    assert float(layer.spikes.detach()) == float(((z >= t) & (z > 0)).flatten(1).sum(1).float().mean())
    (y.sum() + layer.spikes).backward()
    assert layer.threshold.grad is not None and bool((layer.threshold.grad != 0).all())  # fast-sigmoid surrogate
    layer.threshold.data[0] = -1.0  # a threshold pushed below 0 acts as, and is stored as, 0
    assert layer.trained_params({"threshold": None, "beta": 0.9})["threshold"] == [0.0, 0.5, 0.0]


def test_vsn_finetune_learns_thresholds_and_the_spike_penalty_cuts_spikes(run_cli, tiny_files):
    import json

    d, f = tiny_files["dir"], tiny_files
    assert run_cli("calibrate", f["checkpoint"], "-m", "conftest:tiny_cnn", "-d", f["data"], "--neuron", "vsn",
                   "--samples", 60, "--param", "tradeoff=0.1", "-o", d / "v.json")[0] == 0
    before = json.loads((d / "v.json").read_text())
    spikes = {}
    for penalty in (0, 300):
        out = d / f"ft{penalty}.safetensors"
        code, _, err = run_cli("finetune", "--trust-code", f["checkpoint"], "-c", d / "v.json", "-d", f["data"], "--epochs", 10,
                               "--lr", 3e-3, "--spike-penalty", penalty, "--batch-size", 20, "--device", "cpu", "-o", out)
        assert code == 0, err
        after = json.loads(out.with_suffix(".calib.json").read_text())
        assert [la["params"]["threshold"] for la in after["layers"]] != [la["params"]["threshold"] for la in before["layers"]]
        assert after["finetune"]["spike_penalty"] == penalty
        assert run_cli("convert", "--trust-code", out, "-c", out.with_suffix(".calib.json"), "-o", d / "a.snn.safetensors")[0] == 0
        code, _, err = run_cli("evaluate", "--trust-code", d / "a.snn.safetensors", "-d", f["data"], "-T", 1, "-r", d / f"r{penalty}")
        assert code == 0, err
        spikes[penalty] = json.loads((d / f"r{penalty}" / "report.json").read_text())["snn"]["spikes_per_sample"]
    assert spikes[300] < 0.9 * spikes[0]  # same training, the penalty alone makes the difference


def test_aroused_sample_fires_against_scaled_thresholds_and_the_other_is_unchanged():
    torch.manual_seed(3)
    z = torch.rand(6, 2, 5) * 1.2  # steps x batch x units
    both, lone_low, lone_high = vsn.VSNNeuron(0.7, 0.8), vsn.VSNNeuron(0.7, 0.8), vsn.VSNNeuron(0.7, 0.8)
    outs = []
    for t in range(6):
        if t == 3:
            both.set_precision(torch.tensor([True, False]), 0.25)
            lone_high.threshold = torch.tensor(0.7 * 0.25)  # from step 3 on, the memory carried over
        outs.append((both(z[t]), lone_low(z[t, 1:]), lone_high(z[t, :1])))
    for t, (y, low, high) in enumerate(outs):
        assert torch.equal(y[1:], low)  # the sample left alone is unchanged
        assert torch.equal(y[:1], high)  # the aroused one follows the lower threshold from step 3
    assert any(not torch.equal(y[:1], vsn.vsn_transfer_one_step(z[t, :1], torch.tensor(0.7))) for t, (y, _, _) in
               enumerate(outs) if t >= 3)


def test_vsn_arousal_in_evaluate(run_cli, tiny_files):
    import json

    d, f = tiny_files["dir"], tiny_files
    assert run_cli("calibrate", f["checkpoint"], "-m", "conftest:tiny_cnn", "-d", f["data"], "--neuron", "vsn",
                   "--samples", 60, "--param", "tradeoff=1", "-o", d / "v.json")[0] == 0
    assert run_cli("convert", "--trust-code", f["checkpoint"], "-c", d / "v.json", "-o", d / "v.snn.safetensors")[0] == 0
    code, out, err = run_cli("evaluate", "--trust-code", d / "v.snn.safetensors", "-d", f["data"], "-T", 6, "-r", d / "rep",
                             "--arousal-policy", "at=2,threshold=1,threshold_scale=0")
    assert code == 0, err
    a = json.loads((d / "rep" / "report.json").read_text())["arousal"]
    assert a["mechanism"].startswith("VSN thresholds") and "VSN layer" in a["description"]
    assert a["fraction_aroused"] == 1.0
    low, high, mixed = (a[k]["spikes_per_sample"] for k in ("fixed_low", "fixed_high", "with_arousal"))
    assert low < mixed < high  # aroused from step 3: between the two fixed settings
    code, _, err = run_cli("evaluate", "--trust-code", d / "v.snn.safetensors", "-d", f["data"], "-T", 2, "-r", d / "rep2",
                           "--arousal-policy", "at=2")
    assert code == 2 and "--arousal at=2" in err


class _Smooth(torch.nn.Module):
    """conv -> GELU -> pool -> linear -> SiLU -> linear, with the functional forms."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(36, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d(torch.nn.functional.gelu(self.conv(x)), 2)
        return self.fc2(torch.nn.functional.silu(self.fc1(x.flatten(1))))


def test_gelu_and_silu_slots_compute_the_ann_and_a_one_step_vsn_gates_them():
    from ann2snn.conversion.statistics import activation_stats
    from ann2snn.conversion.graph import slot_activations
    from ann2snn.io.data import TensorData

    torch.manual_seed(4)
    model = _Smooth().eval()
    gm, rows = normalize(model)
    assert slot_activations(gm) == {"act0": "gelu", "act1": "silu"}
    assert sum("GELU: VSN only" in r.detail for r in rows) == 1 and sum("SILU" in r.detail for r in rows) == 1
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # the slots compute GELU and SiLU
        snn = to_snn(gm, {"act0": vsn.VSNNeuron(0.0, sigma="gelu"), "act1": vsn.VSNNeuron(0.0, sigma="silu")})
        F = torch.nn.functional
        gated = F.avg_pool2d(F.gelu(model.conv(x)) * (model.conv(x) > 0), 2).flatten(1)
        ref = model.fc2(F.silu(model.fc1(gated)) * (model.fc1(gated) > 0))
        assert torch.allclose(snn(x), ref, atol=1e-6)  # T = 0: the gate drops only the negative part
    stats = activation_stats(gm, TensorData("t", "file", x, torch.zeros(16, dtype=torch.long), 3), 99.9)
    assert stats["act0"].activation == "gelu" and 0 < stats["act0"].negative_energy_fraction < 1
    for sigma in ("gelu", "silu"):
        t = torch.tensor([0.0, 0.05, 0.7, 3.0])
        assert torch.allclose(vsn.SIGMAS[sigma](vsn.input_threshold(t, sigma)), t, atol=1e-5)
        y = vsn.VSNNeuron(t.tolist(), sigma=sigma)(torch.linspace(-1, 4, 40).view(10, 4))
        z = torch.linspace(-1, 4, 40).view(10, 4)
        a = vsn.SIGMAS[sigma](z)
        assert torch.allclose(y, a * ((a >= t - 1e-5) & (z > 0)))  # thresholds act in output units


def test_vsn_converts_a_gelu_network_and_if_is_refused(run_cli, tiny_files):
    import json
    from safetensors.torch import save_file

    d = tiny_files["dir"]
    torch.manual_seed(0)
    model = _Smooth()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "s.safetensors"))
    with torch.no_grad():
        x = torch.rand(60, 1, 8, 8)
        F = torch.nn.functional
        c = model.conv(x)
        h = model.fc1(F.avg_pool2d(F.gelu(c) * (c > 0), 2).flatten(1))
        gated = model.fc2(F.silu(h) * (h > 0))  # what a one-step VSN with T = 0 computes
        save_file({"inputs": x, "targets": gated.argmax(1)}, str(d / "sd.safetensors"))
    args = ("-m", "test_vsn:_Smooth", "-d", d / "sd.safetensors", "--samples", 60)
    assert run_cli("calibrate", d / "s.safetensors", *args, "--neuron", "vsn", "-o", d / "v.json")[0] == 0
    layers = json.loads((d / "v.json").read_text())["layers"]
    assert [la["activation"] for la in layers] == ["gelu", "silu"] and layers[0]["params"]["sigma"] == "gelu"
    code, out, err = run_cli("convert", "--trust-code", d / "s.safetensors", "-c", d / "v.json", "-o", d / "v.snn.safetensors")
    assert code == 0 and "GELU: VSN only" in out, err
    code, _, err = run_cli("evaluate", "--trust-code", d / "v.snn.safetensors", "-d", d / "sd.safetensors", "-T", 1, "-r", d / "r")
    assert code == 0, err
    report = json.loads((d / "r" / "report.json").read_text())
    assert report["snn"]["accuracy"] == 1.0 == report["ann"]["transfer_accuracy"]
    code, _, err = run_cli("evaluate", "--trust-code", d / "v.snn.safetensors", "-d", d / "sd.safetensors", "-T", 1, "-r", d / "r2",
                           "--compare", "if")
    assert code == 2 and "layer act0 is GELU: IF neurons" in err and err.count("\n") == 1
    code, _, err = run_cli("calibrate", d / "s.safetensors", *args, "--neuron", "asn", "-o", d / "a.json")
    assert code == 2 and "layer act0 is GELU: ASN neurons" in err


def test_zoo_lenet5_takes_the_activation_as_a_model_argument():
    import pytest

    from ann2snn.conversion.graph import slot_activations
    from ann2snn.errors import UserError
    from ann2snn.io.zoo import resolve_model

    gm, _ = normalize(resolve_model("lenet5", {"activation": "silu", "user": {}}))
    assert set(slot_activations(gm).values()) == {"silu"} and len(slot_activations(gm)) == 4
    with pytest.raises(UserError, match="activation='tanh'"):
        resolve_model("lenet5", {"activation": "tanh", "user": {}})


def test_vsn_budget_search_spends_more_of_a_larger_budget_for_a_closer_output(run_cli, tiny_files):
    """The search ranks candidates by output error against the ANN, not by accuracy on the
    search images (which ties near 100% and made every budget pick the sparsest setting)."""
    d, f = tiny_files["dir"], tiny_files
    chosen = []
    for budget in (40, 1e9):
        code, out, err = run_cli("calibrate", f["checkpoint"], "-m", "conftest:tiny_cnn", "-d", f["data"],
                                 "--neuron", "vsn", "--budget", budget, "-T", 1, "-o", d / f"b{budget:g}.json")
        assert code == 0, err
        search = json.loads((d / f"b{budget:g}.json").read_text())["budget_search"]
        within = [c for c in search["candidates"] if c["spikes_per_sample"] <= budget]
        assert search["chosen"] == min(within, key=lambda c: (c["output_error"], c["spikes_per_sample"]))
        assert "error vs ANN" in out
        assert "channels)" in out and "threshold=[" not in out  # per-channel thresholds as a range
        chosen.append(search["chosen"])
    assert chosen[1]["output_error"] < 1e-9 and chosen[1]["tradeoff"] == 0  # unlimited: the exact ANN
    assert chosen[0]["spikes_per_sample"] <= 40 < chosen[1]["spikes_per_sample"]
    assert chosen[0]["output_error"] > chosen[1]["output_error"]


def test_graded_events_are_costed_after_the_average_pool(run_cli, tiny_files):
    """TinyCNN: conv -> ReLU (act0) -> 2x2 average pool -> fc1 (16 units) -> ReLU (act1) -> fc2
    (3). With threshold 0 a one-step VSN passes every positive value: act0's events travel as
    pooled values (a window with any positive value is one event into fc1's 16 units), act1's
    as they are (3 synapses each); IF on the same network keeps counting spikes before the pool."""
    d = tiny_files["dir"]
    assert run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                   "--neuron", "vsn", "--samples", 40, "-o", d / "v.json")[0] == 0
    assert run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "v.json",
                   "-o", d / "v.snn.safetensors")[0] == 0
    code, _, err = run_cli("evaluate", "--trust-code", d / "v.snn.safetensors", "-d", tiny_files["data"], "-T", 1,
                           "-r", d / "rep", "--device", "cpu")
    assert code == 0, err
    layers = {la["name"]: la for la in json.loads((d / "rep" / "report.json").read_text())["layers"]}
    model = tiny_cnn()
    x = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        act0 = torch.relu(model.bn(model.conv(x)))
        pooled = model.pool(act0)
        act1 = torch.relu(model.fc1(pooled.flatten(1)))
    assert layers["act0"]["spikes_per_sample"] == float((act0 > 0).sum()) / 60  # the neurons' own events
    assert layers["act0"]["synops_per_sample"] == 16 * float((pooled > 0).sum()) / 60
    assert layers["act1"]["synops_per_sample"] == 3 * float((act1 > 0).sum()) / 60
    assert 16 * float((pooled > 0).sum()) < 16 * float((act0 > 0).sum())  # pooling first is cheaper
