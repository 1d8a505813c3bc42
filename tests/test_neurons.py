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
