import torch

from ann2snn.neurons import if_neuron as ifn


def test_if_step_matches_hand_trace():
    # theta = 1, v_init = 0.5, constant current 0.3:
    # v: 0.5+0.3=0.8 (no spike), 1.1 -> spike, v=0.1; 0.4; 0.7; 1.0 -> spike, v=0.0
    p = ifn.IFParams(torch.tensor(1.0), 0.5)
    current = torch.tensor([0.3])
    state = ifn.if_init(current, p)
    spikes, vs = [], []
    for _ in range(5):
        s, state = ifn.if_step(current, state, p)
        spikes.append(float(s))
        vs.append(float(state.v))
    assert spikes == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert torch.allclose(torch.tensor(vs), torch.tensor([0.8, 0.1, 0.4, 0.7, 0.0]), atol=1e-6)


def test_if_rate_approaches_transfer_function():
    p = ifn.IFParams(torch.tensor(2.0), 0.5)
    current = torch.tensor([-1.0, 0.0, 0.5, 1.3, 2.0, 3.0])
    state, total, steps = ifn.if_init(current, p), torch.zeros(6), 1000
    for _ in range(steps):
        s, state = ifn.if_step(current, state, p)
        total += s * p.threshold
    assert torch.allclose(total / steps, ifn.if_transfer(current, p), atol=2.0 / steps)


def test_if_module_keeps_state_and_resets():
    m = ifn.IFNeuron(threshold=1.0, v_init=0.0)
    x = torch.full((2, 3), 0.6)
    assert m(x).sum() == 0
    assert torch.equal(m(x), torch.ones(2, 3))  # 1.2 >= 1, output height = theta
    assert torch.equal(m.spikes, torch.ones(2, 3))
    m.reset()
    assert m(x).sum() == 0


def test_a_burst_if_neuron_with_one_spike_per_step_is_the_if_neuron_and_more_spikes_cut_latency():
    from ann2snn.neurons.if_neuron import IFParams, if_init, if_step

    gen = torch.Generator().manual_seed(0)
    current = torch.rand(64, 10, generator=gen) * 3.0  # up to 3 thresholds per step
    one, burst = IFParams(torch.tensor(1.0), 0.5, 1), IFParams(torch.tensor(1.0), 0.5, 3)
    plain = IFParams(torch.tensor(1.0), 0.5)
    s1, s2, s3 = if_init(current, one), if_init(current, plain), if_init(current, burst)
    total = torch.zeros_like(current)
    for _ in range(40):
        a, s1 = if_step(current, s1, one)
        b, s2 = if_step(current, s2, plain)
        c, s3 = if_step(current, s3, burst)
        assert torch.equal(a, b) and c.max() <= 3 and torch.equal(c, c.floor())
        total += c
    # a current of up to 3 thresholds per step is coded without saturation: within one spike of T I
    assert (total - 40 * current).abs().max() <= 1.0 + 1e-4 and total.max() > 40  # beyond one spike per step


def test_per_channel_if_thresholds_are_each_channels_percentile(run_cli, tiny_files):
    import json

    d = tiny_files["dir"]
    code, _, err = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                           "--samples", 60, "--param", "per_channel=true", "--param", "max_spikes=2",
                           "-o", d / "p.json")
    assert code == 0, err
    layers = json.loads((d / "p.json").read_text())["layers"]
    conv, fc = layers[0]["params"], layers[1]["params"]
    assert isinstance(conv["threshold"], list) and len(conv["threshold"]) == 4 and conv["max_spikes"] == 2
    assert isinstance(fc["threshold"], float)  # a fully connected layer keeps one threshold
    from conftest import tiny_cnn
    model = tiny_cnn()
    x = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        act = torch.relu(model.bn(model.conv(x)))
    want = [float(torch.quantile(act[:, c].double().flatten(), 0.999)) / 2 for c in range(4)]  # / max_spikes
    assert all(abs(a - b) <= 1e-5 * max(b, 1.0) for a, b in zip(conv["threshold"], want))
    assert run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "p.json", "-o", d / "s.snn")[0] == 0
    code, _, err = run_cli("evaluate", "--trust-code", d / "s.snn", "-d", tiny_files["data"], "-T", 32, "-r", d / "r",
                           "--device", "cpu")
    assert code == 0, err
    report = json.loads((d / "r" / "report.json").read_text())
    assert report["snn"]["accuracy"] >= 0.85
