"""The time-to-first-spike neuron (neurons/ttfs.py): its step, its exactness against the
transfer network (max pooling and residual sums included), one spike per neuron, the fused
scan against the step, the forward-pass choice of the resolution, and the CLI path."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ann2snn import neurons
from ann2snn.conversion import layer_calibration
from ann2snn.conversion.graph import normalize, slot_schedule, to_snn
from ann2snn.conversion.statistics import activation_stats
from ann2snn.io.data import TensorData
from ann2snn.io.zoo import resolve_model
from ann2snn.neurons.ttfs import TTFSNeuron, lowest_level, ttfs_transfer
from ann2snn.search import exact
from ann2snn.search.budget import ann_outputs
from ann2snn.search.transfer_training import with_transfer
from ann2snn.sim.network import Fanouts, build_network
from ann2snn.sim.simulate import stateful_modules
from ann2snn.store.artifact import build_neurons
from ann2snn.store.profile import make_layers

CPU = torch.device("cpu")
TTFS = neurons.get("ttfs")


def test_one_neuron_fires_once_at_the_step_the_formula_gives():
    K, theta, start = 8, 2.0, 5
    v = torch.tensor([-1.0, 0.0, 0.1, 0.13, 0.5, 1.0, 1.3, 1.99, 2.0, 7.0])
    level = torch.clamp(torch.floor(v * K / theta + 0.5), 0, K)  # round to the nearest level, clip
    cell = TTFSNeuron(theta, K)
    cell.place(start)
    spikes, out = [], None
    for _ in range(start + K + 3):
        out = cell(v)
        spikes.append(cell.spikes)
    spikes = torch.stack(spikes)
    assert spikes.sum(0).max() <= 1
    fired = level > 0
    assert torch.equal(spikes.sum(0) == 1, fired)
    when = spikes.argmax(0)
    assert torch.equal(when[fired], (start + K - level[fired]).long())  # x = theta (end - t) / K
    assert torch.allclose(out, theta * level / K)
    assert torch.equal(out, ttfs_transfer(v, torch.tensor(theta), K))
    assert spikes[:start].sum() == 0  # silent before its window


def test_a_floor_silences_the_levels_below_it():
    """With floor f a unit whose level is below max(1, ceil(f K)) never fires and codes 0; the
    others fire at the formula's step as without it."""
    K, theta, floor = 8, 2.0, 0.3
    v = torch.linspace(-0.5, 2.5, 61)
    level = torch.clamp(torch.floor(v * K / theta + 0.5), 0, K)
    lowest = lowest_level(floor, K)
    assert lowest == 3 and lowest_level(0.0, K) == 1 and lowest_level(0.25, K) == 2  # f K = 2 exactly: level 2 sends
    cell = TTFSNeuron(theta, K, floor)
    spikes, out = [], None
    for _ in range(K + 2):
        out = cell(v)
        spikes.append(cell.spikes)
    spikes = torch.stack(spikes)
    fired = level >= lowest
    assert torch.equal(spikes.sum(0) == 1, fired) and spikes.sum(0).max() <= 1
    assert torch.equal(spikes.argmax(0)[fired], (K - level[fired]).long())
    assert torch.equal(out, torch.where(fired, theta * level / K, 0.0))
    assert torch.equal(out, ttfs_transfer(v, torch.tensor(theta), K, floor))


def _fitted(gm, x, levels, floor=0.0):
    data = TensorData("t", "train", x, torch.zeros(len(x), dtype=torch.long), 4)
    stats = activation_stats(gm, data, 99.9, 64, "cpu")
    return make_layers(gm, stats, TTFS, TTFS.options({"levels": levels, "floor": floor})), data


def _final_output(snn, x, steps):
    for m in stateful_modules(snn):
        m.reset()
    with torch.no_grad():
        for _ in range(steps):
            out = snn(x)
    return out


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_two_layers_in_float64_equal_the_clipped_ann():
    torch.manual_seed(0)
    gm, _ = normalize(TwoLayer())
    x = torch.randn(64, 6, dtype=torch.float64)
    layers, _ = _fitted(gm, x.float(), 4096)
    gm = gm.double()
    snn = to_snn(gm, build_neurons(TTFS, layers)).double()
    steps = slot_schedule(snn, {layer.name: 4096 for layer in layers})["output"]
    assert steps == 2 * 4096
    x = 3 * x  # beyond the calibration images' range: the clip at theta matters
    out = _final_output(snn, x, steps)
    clipped = copy.deepcopy(gm)  # the ANN with each ReLU clipped at its layer's theta
    for layer in layers:
        clipped.add_submodule(layer.name, nn.Hardtanh(0.0, layer.params["threshold"]).double())
    clipped.recompile()
    assert torch.allclose(out, clipped(x), atol=5e-3)
    assert not torch.allclose(out, gm(x), atol=5e-2)  # the clip is there


def _net(name):
    torch.manual_seed(0)
    net = resolve_model(name, {"width": 8, "num_classes": 4}).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return normalize(net)[0]


@pytest.mark.parametrize("model,maxpool,floor", [("vgg16_bn", "spikes", 0.0), ("vgg16_bn", "gated", 0.0),
                                                 ("resnet18", "gated", 0.0), ("resnet18", "gated", 0.2)])
def test_max_pooling_and_residual_sums_are_exact(model, maxpool, floor):
    """At its answer step the SNN's output is the transfer network's, bit for bit: max pooling
    passes the earliest spike and residual sums add settled charges (with a dead zone too)."""
    gm = _net(model)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layers, _ = _fitted(gm, x, 6, floor)
    snn = to_snn(gm, build_neurons(TTFS, layers), maxpool)
    steps = slot_schedule(snn, {layer.name: 6 for layer in layers})["output"]
    reference = with_transfer(gm, TTFS, layers)(x)
    assert torch.equal(_final_output(snn, x, steps), reference)
    assert not torch.equal(_final_output(snn, x, steps - 1), reference)  # complete only at the answer step


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_spikes_at_most_one_per_neuron_and_fused_scan_equals_the_step(floor):
    gm = _net("resnet18")
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layers, data = _fitted(gm, x, 5, floor)
    fan = Fanouts(gm, data.sample_shape)
    net = build_network(gm, TTFS, layers, TTFS.options({"levels": 5, "floor": floor}), 100, fan)
    steps = net.answer_step + 4
    ref = net.simulate(data, steps, 6, CPU, engine="steps")
    # chunks of one step, of 2 steps (they start mid-window), of 8 steps (cut at the window edges,
    # where outputs are constant chunks of B rows), and one (cut there too)
    for budget in (1 << 14, 3 << 19, 6 << 20, 1 << 26):
        fused = net.simulate(data, steps, 6, CPU, engine="layers", memory_budget=budget)
        assert torch.equal(fused.spikes, ref.spikes) and torch.equal(fused.synops, ref.synops)
        assert torch.equal(fused.metric, ref.metric)
    units = torch.tensor([layer.neurons for layer in layers], dtype=torch.float64)
    assert (ref.spikes.sum(1) <= units * len(x)).all() and ref.spikes.sum() > 0
    for m in stateful_modules(net.snn):  # per unit: count with the reference step
        m.reset()
    totals = {}
    with torch.no_grad():
        for _ in range(steps):
            net.snn(x)
            for layer in layers:
                s = net.snn.get_submodule(layer.name).spikes
                totals[layer.name] = totals.get(layer.name, 0) + s
    assert max(float(t.max()) for t in totals.values()) == 1.0


def test_forward_pass_choice_counts_the_spikes_the_snn_spends():
    gm = _net("vgg16_bn")
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    layers, data = _fitted(gm, x, 8)
    stats = activation_stats(gm, data, 99.9, 64, "cpu")
    measured = exact.measure(gm, TTFS, TTFS.options({"levels": 8}), stats, data, ann_outputs(gm, data, 16, CPU),
                             16, CPU)
    net = build_network(gm, TTFS, layers, TTFS.options({"levels": 8}), 200, Fanouts(gm, data.sample_shape))
    sim = net.simulate(data, net.answer_step, 16, CPU)
    assert measured["spikes_per_sample"] == pytest.approx(float(sim.spikes.sum()) / len(x), rel=1e-12)
    assert measured["accuracy"] == float(sim.metric[-1]) / len(x)
    options, record, _, _ = exact.choose(gm, stats, TTFS, TTFS.options({}), data, None, 16, CPU)
    assert options["levels"] == record.chosen["levels"] and len(record.candidates) == len(TTFS.precision.values)
    gm, data, stats = _lenet()
    _, record, _, _ = exact.choose(gm, stats, TTFS, TTFS.options({}), data, None, 16, CPU)
    budget = record.candidates[3]["spikes_per_sample"]
    _, on_budget, _, _ = exact.choose(gm, stats, TTFS, TTFS.options({}), data, budget, 16, CPU)
    assert on_budget.chosen["spikes_per_sample"] <= budget and on_budget.met


def test_the_per_layer_walk_meets_a_budget_the_levels_alone_miss():
    """``refine`` raises dead zones layer by layer until the spikes are within the budget; its end
    is a recorded candidate whose floors code the lowest levels it lists."""
    gm, data, stats = _lenet()
    pool = exact.Candidates(gm, stats, TTFS, TTFS.options({}), data, 16, CPU, 0)
    quick = exact.Candidates(gm, stats, TTFS, TTFS.options({}), data, 16, CPU, 0)
    plain = pool.measure({"levels": 8, "floor": 0.0})
    budget = 0.9 * plain["spikes_per_sample"]
    end = exact.refine(pool, quick, 8, budget)
    assert end["spikes_per_sample"] <= budget and max(end["layer_lowest"]) > 1
    assert {k: v for k, v in end.items() if not k.startswith("_")} == pool.tried[-1]
    assert [lowest_level(layer.params["floor"], 8) for layer in end["_layers"]] == end["layer_lowest"]
    assert end["output_error"] > plain["output_error"]  # silencing costs some error


def _lenet():
    """A small LeNet-5 (4 spiking layers) and 32 images: the budget searches' test case."""
    torch.manual_seed(0)
    gm = normalize(resolve_model("lenet5", {"num_classes": 4}).eval())[0]
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    _, data = _fitted(gm, x, 8)
    return gm, data, activation_stats(gm, data, 99.9, 64, "cpu")


def test_a_budget_search_tries_each_dead_zone_once_and_sets_it():
    """Under --budget the levels are tried with every floor, combinations that code alike once;
    a higher floor spends fewer spikes at the same levels; the least output error within the
    budget is chosen, its levels and floor set."""
    gm, data, stats = _lenet()
    tried = exact.candidates(TTFS, TTFS.options({}), 1.0)
    codes = [(c["levels"], lowest_level(c["floor"], c["levels"])) for c in tried]
    assert len(set(codes)) == len(codes) > len(TTFS.precision.values)
    assert {(k, 1) for k in TTFS.precision.values} <= set(codes)
    _, plain, _, none = exact.choose(gm, stats, TTFS, TTFS.options({}), data, None, 16, CPU)
    assert none is None  # without a budget nothing is corrected
    budget = 0.9 * next(c["spikes_per_sample"] for c in plain.candidates if c["levels"] == 32)
    options, record, layers, _ = exact.choose(gm, stats, TTFS, TTFS.options({}), data, budget, 16, CPU, 0)
    at32 = [c["spikes_per_sample"] for c in record.candidates  # the grid's floors at 32 levels, in rising order
            if c["levels"] == 32 and "layer_lowest" not in c]
    assert len(at32) == len({lowest_level(f, 32) for f in TTFS.precision.budget_grid["floor"]}) > 2
    assert at32 == sorted(at32, reverse=True)
    assert at32[-1] < at32[0]
    within = [c for c in record.candidates if c["spikes_per_sample"] <= budget]
    assert record.met and record.chosen == min(within, key=lambda c: (c["output_error"], c["spikes_per_sample"]))
    assert (options["levels"], options["floor"]) == (record.chosen["levels"], record.chosen["floor"])
    walked = [c for c in record.candidates if "layer_lowest" in c]  # dead zones per layer, at 2-3 levels
    assert walked and all(len(c["layer_lowest"]) == len(layers) for c in walked)
    lowest = record.chosen.get("layer_lowest", [lowest_level(options["floor"], options["levels"])] * len(layers))
    assert [lowest_level(layer.params["floor"], options["levels"]) for layer in layers] == lowest


def _layer_error(gm, net, layer, x):
    """Mean absolute error per channel of ``layer``'s output in ``net`` against the ANN's on ``x``."""
    seen = {}
    handle = net.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))
    with torch.no_grad():
        net(x)
        target = layer_calibration.ann_means(gm, [layer], x, len(x))[layer]
    handle.remove()
    return float((target - layer_calibration.channel_sum(seen["out"]) / len(x)).abs().mean())


def test_the_forward_pass_layer_calibration_reduces_each_layers_error_and_the_snn_equals_it():
    """Dead zones and coarse levels bias each layer's mean; the correction, fitted in one forward
    pass layer after layer, reduces every corrected layer's error against the ANN (with the
    corrections below it in place), is deterministic, leaves a network equal to its ANN alone, and
    the simulated SNN with it (dead zones per layer) equals its transfer network at the answer step."""
    gm = _net("resnet18")
    x = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    layers, data = _fitted(gm, x, 6)
    layers = exact.with_floors(layers, [1 + i % 3 for i in range(len(layers))], 6)
    images = exact.correction_images(data, 48)
    record = exact.correction(gm, TTFS, layers, images, CPU)
    assert record == exact.correction(gm, TTFS, layers, images, CPU) and record.timesteps == 0
    assert len(record.corrections) == len(layers)
    for i, c in enumerate(record.corrections):
        below = type(record)(timesteps=0, samples=48, rounds=1, corrections=record.corrections[:i])
        upto = type(record)(timesteps=0, samples=48, rounds=1, corrections=record.corrections[:i + 1])
        before = _layer_error(gm, exact.transfer_network(gm, TTFS, layers, below), c.layer, x)
        assert before == pytest.approx(c.error_before, rel=1e-4)
        assert _layer_error(gm, exact.transfer_network(gm, TTFS, layers, upto), c.layer, x) < before
    assert not layer_calibration.fit_transfer(gm, copy.deepcopy(gm), [la.name for la in layers], x, CPU).corrections
    net = build_network(gm, TTFS, layers, TTFS.options({"levels": 6}), 1, Fanouts(gm, data.sample_shape),
                        calibration=record)
    sim = net.simulate(data, net.answer_step, 16, CPU)
    reference = ann_outputs(gm, data, 16, CPU)
    stats = activation_stats(gm, data, 99.9, 64, "cpu")
    forward = exact.measure(gm, TTFS, {}, stats, data, reference, 16, CPU, layers, record)
    plain = exact.measure(gm, TTFS, {}, stats, data, reference, 16, CPU, layers)
    assert forward["spikes_per_sample"] == pytest.approx(float(sim.spikes.sum()) / len(x), rel=1e-12)
    assert forward["accuracy"] == float(sim.metric[-1]) / len(x)
    assert forward["output_error"] < plain["output_error"]


def test_cli_ttfs_end_to_end(run_cli, tmp_path):
    """calibrate chooses the levels by forward passes and records them; evaluate reports the answer
    step and both energy counts beside IF; bad options are refused in one line."""
    gm_net = resolve_model("resnet18", {"width": 8, "num_classes": 4}).eval()
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = gm_net(x).argmax(1)
    save_file({k: v.contiguous() for k, v in gm_net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    common = ["-m", "resnet18", "--model-arg", "width=8", "--model-arg", "num_classes=4"]
    code, out, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                             "--neuron", "ttfs", "-o", tmp_path / "p.json")
    assert code == 0, err
    profile = json.loads((tmp_path / "p.json").read_text())
    levels = profile["neuron"]["options"]["levels"]
    assert profile["exact_choice"]["chosen"]["levels"] == levels and "<- chosen" in out
    assert run_cli("convert", tmp_path / "w.safetensors", "-c", tmp_path / "p.json", "-o", tmp_path / "t.snn")[0] == 0
    answer = 17 * levels  # resnet18: 17 spiking layers on the longest path
    code, out, err = run_cli("evaluate", tmp_path / "t.snn", "-d", tmp_path / "d.safetensors", "-T", answer,
                             "--compare", "if", "-r", tmp_path / "rep", "--device", "cpu")
    assert code == 0, err
    assert f"answer complete at step {answer}" in out
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    snn = report["snn"]
    assert snn["answer_step"] == answer and snn["accuracy"] == report["ann"]["transfer_accuracy"]
    units = snn["neurons"]
    assert snn["spikes_per_sample"] <= units
    rate = report["variants"][0]["snn"]
    assert rate["answer_step"] is None
    for s in (snn, rate):  # event-driven never counts more updates than clock-driven (every unit, every step)
        assert 0 < s["neuron_updates_event_driven_per_sample"]["updates"] <= units * answer
    # a TTFS unit is idle outside its sources' windows and its own: 17 windows, each unit in at most two
    assert snn["neuron_updates_event_driven_per_sample"]["updates"] <= units * 2 * levels
    for bad, what in ((["-T", answer - 1], "-T"), (["-T", answer, "--start-ms", 3], "start")):
        code, _, err = run_cli("evaluate", tmp_path / "t.snn", "-d", tmp_path / "d.safetensors", *bad,
                               "-r", tmp_path / "bad", "--device", "cpu")
        assert code != 0 and what in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                           "--neuron", "ttfs", "--budget", "100", "--param", "levels=8", "-o", tmp_path / "b.json")
    assert code != 0 and "levels" in err and "Traceback" not in err
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                           "--neuron", "ttfs", "--layer-calibration", "8", "-o", tmp_path / "lc.json")
    assert code != 0 and "layer-calibration" in err and "Traceback" not in err and not (tmp_path / "lc.json").exists()
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                           "--neuron", "ttfs", "--param", "levels=0", "-o", tmp_path / "l0.json")
    assert code != 0 and "levels" in err and "Traceback" not in err
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                           "--neuron", "ttfs", "--budget", "100", "--param", "floor=0.1", "-o", tmp_path / "b.json")
    assert code != 0 and "floor" in err and "Traceback" not in err and not (tmp_path / "b.json").exists()
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                           "--neuron", "ttfs", "--param", "floor=1", "-o", tmp_path / "f1.json")
    assert code != 0 and "floor" in err and "Traceback" not in err and not (tmp_path / "f1.json").exists()


def test_cli_ttfs_budget_sets_dead_zones_and_a_layer_calibration_the_snn_keeps(run_cli, tmp_path):
    """Under a budget below the share of positive activations, calibrate chooses levels and dead
    zones (per layer where the walk wins), fits the layer calibration by a forward pass, and the
    converted SNN equals that forward pass; --layer-calibration 0 leaves it out."""
    gm_net = resolve_model("lenet5", {"num_classes": 4}).eval()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = gm_net(x).argmax(1)
    save_file({k: v.contiguous() for k, v in gm_net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    common = ["-m", "lenet5", "--model-arg", "num_classes=4", "-d", tmp_path / "d.safetensors", "--neuron", "ttfs"]
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-o", tmp_path / "p.json")
    assert code == 0, err
    units = sum(layer["neurons"] for layer in json.loads((tmp_path / "p.json").read_text())["layers"])
    budget = 0.45 * units
    code, out, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "--budget", budget,
                             "-o", tmp_path / "fb.json")
    assert code == 0, err
    chosen = json.loads((tmp_path / "fb.json").read_text())
    choice = chosen["exact_choice"]["chosen"]
    assert choice["spikes_per_sample"] <= budget and "floor=" in out and "layer calibration by a forward pass" in out
    assert chosen["neuron"]["options"]["floor"] == choice["floor"]
    levels = chosen["neuron"]["options"]["levels"]
    lowest = choice.get("layer_lowest", [lowest_level(choice["floor"], levels)] * len(chosen["layers"]))
    assert [lowest_level(layer["params"]["floor"], levels) for layer in chosen["layers"]] == lowest
    assert chosen["layer_calibration"]["timesteps"] == 0 and chosen["layer_calibration"]["corrections"]
    # the SNN, corrections and dead zones included, equals the forward pass that chose it
    assert run_cli("convert", tmp_path / "w.safetensors", "-c", tmp_path / "fb.json", "-o", tmp_path / "fb.snn")[0] == 0
    code, out, err = run_cli("evaluate", tmp_path / "fb.snn", "-d", tmp_path / "d.safetensors", "-T", 4 * levels,
                             "-r", tmp_path / "fbrep", "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "fbrep" / "report.json").read_text())
    assert report["snn"]["accuracy"] == report["ann"]["transfer_accuracy"]
    assert report["snn"]["spikes_per_sample"] == pytest.approx(choice["spikes_per_sample"], rel=1e-9)
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "--budget", budget,
                           "--layer-calibration", "0", "-o", tmp_path / "nc.json")
    assert code == 0, err
    assert "layer_calibration" not in json.loads((tmp_path / "nc.json").read_text())
