"""Bias ramps (ann2snn/bias_ramp.py): each layer's offset follows the gain of its spiking input."""

import json

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.conversion import bias_ramp
from ann2snn.io.data import TensorData
from ann2snn.errors import UserError
from ann2snn.sim.energy import fanout_maps
from ann2snn.conversion.graph import normalize, spiking_layers, to_snn
from ann2snn.neurons.asn import ASNNeuron
from ann2snn.sim.simulate import simulate
from conftest import tiny_cnn


class _Deep(nn.Module):
    """Conv -> ReLU -> Linear -> ReLU -> Linear (+ a residual that meets the static input)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 1)
        self.f1, self.f2 = nn.Linear(4 * 8 * 8, 12), nn.Linear(12, 3)
        with torch.no_grad():
            for m in (self.c1, self.c2, self.f1, self.f2):
                m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.relu(self.f1(torch.flatten(a + self.c2(x), 1)))
        return self.f2(b)


def _setup():
    torch.manual_seed(0)
    gm, _ = normalize(_Deep().eval())
    layers = spiking_layers(gm)
    x = torch.rand(40, 1, 8, 8)
    return gm, layers, x, {n: ASNNeuron(0.3, scale=1.0, tau_gamma=2.0) for n in layers}


def test_the_fitted_gain_is_the_projection_of_the_signal_on_the_anns_and_is_applied_per_step():
    gm, layers, x, units = _setup()
    ramps = {r.layer: r for r in bias_ramp.fit(gm, to_snn(gm, units), layers, x, 30, torch.device("cpu"))}
    assert layers[0] not in ramps  # the first layer's input is the constant image: gain 1, no ramp
    assert set(ramps) == {layers[1], bias_ramp.OUTPUT}
    out = ramps[bias_ramp.OUTPUT]
    assert out.offset == pytest.approx(gm.get_submodule("f2").bias.tolist(), abs=1e-6)
    assert out.gain[0] < 0.5 * out.gain[-1] and 0.2 < out.gain[-1] < 1.5  # the PSCs below fill up
    # replay: with the ramps in place, each step's ramped output equals W psc + g(t) b and the
    # gain measured from it is the one stored
    snn = to_snn(gm, units, ramps=list(ramps.values()))
    for m in snn.modules():
        if hasattr(m, "reset"):
            m.reset()
    seen = {}
    snn.get_submodule(f"{bias_ramp.OUTPUT}_bias_ramp").register_forward_hook(
        lambda m, i, o: seen.update(current=i[0], ramped=o))
    ann = gm(x).detach()
    b = torch.tensor(out.offset)
    with torch.no_grad():
        for t in range(30):
            y = snn(x)
            assert torch.allclose(y, seen["current"] - (1 - out.gain[t]) * b, atol=1e-5)
            signal, target = seen["current"] - b, ann - b
            assert float((signal * target).sum() / (target * target).sum()) == pytest.approx(out.gain[t], abs=1e-4)


def test_ramps_give_the_same_results_in_both_engines():
    gm, layers, x, units = _setup()
    ramps = bias_ramp.fit(gm, to_snn(gm, units), layers, x, 23, torch.device("cpu"))
    data = TensorData("t", "file", x, gm(x).argmax(1), 3)
    fan = fanout_maps(gm, data.sample_shape)
    runs = [simulate(to_snn(gm, units, ramps=ramps), layers, fan, data, 23, 7, torch.device("cpu"), engine=e,
                     memory_budget=20_000) for e in ("steps", "layers")]
    assert torch.equal(runs[0].metric, runs[1].metric) and torch.equal(runs[0].spikes, runs[1].spikes)
    plain = simulate(to_snn(gm, units), layers, fan, data, 23, 7, torch.device("cpu"))
    assert not torch.equal(plain.spikes, runs[0].spikes)  # the ramps change what the deeper layer receives


def test_a_ramp_naming_no_layer_or_not_fitting_its_layer_is_refused():
    gm, layers, x, units = _setup()
    bad = bias_ramp.BiasRampRecord(layer="nowhere", offset=[0.1], gain=[0.5])
    with pytest.raises(UserError, match="'nowhere', which is not a spiking layer"):
        to_snn(gm, units, ramps=[bad])
    wrong = bias_ramp.BiasRampRecord(layer=layers[1], offset=[0.1, 0.2], gain=[0.5])
    with pytest.raises(UserError, match=f"bias ramp of {layers[1]}: 2 offsets"):
        to_snn(gm, units, ramps=[wrong])(x)
    with pytest.raises(UserError, match="two bias ramps"):
        to_snn(gm, units, ramps=[wrong, wrong])
    with pytest.raises(ValueError, match="finite"):
        bias_ramp.BiasRampRecord(layer=layers[1], offset=[0.1], gain=[float("nan")])


def test_asn_profiles_carry_ramps_through_convert_save_and_load(tmp_path):
    model = tiny_cnn()
    x = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    profile = ann2snn.calibrate(model, (x, y), neuron="asn", options={"m_f": 0.3}, samples=40, timesteps=20,
                                device="cpu")
    assert profile.bias_ramps and {r.layer for r in profile.bias_ramps} <= {*profile.layer_names, "output"}
    assert all(len(r.gain) == 20 for r in profile.bias_ramps)
    off = ann2snn.calibrate(model, (x, y), neuron="asn", options={"m_f": 0.3, "bias_ramp": False}, samples=40,
                            device="cpu")
    assert off.bias_ramps is None
    snn = ann2snn.convert(model, profile)
    assert any(isinstance(m, bias_ramp.BiasRamp) for m in snn.modules())
    ann2snn.save(snn, tmp_path / "a.safetensors")
    again = ann2snn.load(tmp_path / "a.safetensors", tiny_cnn())
    assert torch.equal(again.run(x[:5], 25), snn.run(x[:5], 25))
    assert not torch.equal(ann2snn.convert(model, off).run(x[:5], 25), snn.run(x[:5], 25))
    # a sweep at the profile's own m_f is the same network (ramps on); another m_f runs without them
    report = ann2snn.evaluate(snn, (x, y), timesteps=25, sweep=[{"m_f": 0.3}], compare=["if"], device="cpu")
    assert report.variants[0].curve == report.curve and report.variants[-1].neuron == "if"
    off_report = ann2snn.evaluate(ann2snn.convert(model, off), (x, y), timesteps=25, device="cpu")
    assert report.curve != off_report.curve


def test_a_tampered_ramp_in_a_profile_is_refused_in_one_line(run_cli, tiny_files):
    d = tiny_files["dir"]
    model = ("-m", "conftest:tiny_cnn")
    assert run_cli("calibrate", tiny_files["checkpoint"], *model, "-d", tiny_files["data"], "--neuron", "asn",
                   "--param", "m_f=0.3", "--samples", 30, "-T", 12, "-o", d / "p.json")[0] == 0
    raw = json.loads((d / "p.json").read_text())
    assert raw["bias_ramps"]
    raw["bias_ramps"][0]["gain"][0] = "x"
    (d / "q.json").write_text(json.dumps(raw))
    code, _, err = run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "q.json", "-o", d / "q.snn")
    assert code != 0 and "bias_ramps[0].gain[0]" in err and len(err.strip().splitlines()) == 1
    assert not (d / "q.snn").exists()
    for edit, match in ((lambda r: r["neuron"]["options"].update(bias_ramp=False), "options do not ask for them"),
                        (lambda r: r["bias_ramps"][0].update(offset=r["bias_ramps"][0]["offset"] + [0.0]),
                         "offsets for")):
        raw = json.loads((d / "p.json").read_text())
        edit(raw)
        (d / "r.json").write_text(json.dumps(raw))
        code, _, err = run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "r.json", "-o", d / "r.snn")
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1, err


class _Tokens(nn.Module):
    """A Linear on [N, tokens, features]: its offset is per feature (last dim), not per dim 1."""

    def __init__(self):
        super().__init__()
        self.f0, self.f1, self.f2 = nn.Linear(4, 4), nn.Linear(4, 5), nn.Linear(5 * 8, 3)
        with torch.no_grad():
            self.f1.bias.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2]))

    def forward(self, x):
        a = torch.relu(self.f0(x.view(-1, 8, 4)))
        return self.f2(torch.flatten(torch.relu(self.f1(a)), 1))


def test_an_offset_that_is_not_constant_per_channel_gets_no_ramp():
    gm, _ = normalize(_Tokens().eval())
    layers = spiking_layers(gm)
    units = {n: ASNNeuron(0.3, scale=1.0, tau_gamma=2.0) for n in layers}
    ramps = bias_ramp.fit(gm, to_snn(gm, units), layers, torch.rand(16, 32), 10, torch.device("cpu"))
    assert len(layers) == 2 and {r.layer for r in ramps} == {bias_ramp.OUTPUT}  # not the per-token layer

