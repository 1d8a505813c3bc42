import json
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann2snn.conversion.graph import GatedMaxPool, Slot, normalize, spiking_layers, to_snn
from ann2snn.errors import OptionError, UserError
from ann2snn.neurons.if_neuron import IFNeuron
from ann2snn.io.zoo import list_models, resolve_model

from conftest import tiny_cnn


class AllOps(nn.Module):
    """Every supported operation once, ReLU written in each of its forms."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.mp = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.c1d = nn.Conv1d(8, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(16 + 16, 12)
        self.bn3 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        a = F.relu(self.bn1(self.c1(x)))                    # F.relu
        b = torch.relu(self.bn2(self.c2(a)) + a)             # residual add + torch.relu
        c = self.pool(b).relu()                              # Tensor.relu
        d = torch.clamp(self.mp(self.c2(c)), min=0)          # maxpool -> clamp(min=0)
        e = torch.cat([self.gap(c), self.gap(b)], dim=1)     # concatenation
        e = self.c1d(e.flatten(2)).clamp_min(0)              # Conv1d + clamp_min(0)
        h = torch.cat([d.flatten(1), e.view(e.size(0), -1)], 1)
        h = nn.functional.relu(self.bn3(self.fc1(self.drop(h))))
        return F.log_softmax(self.fc2(h), dim=1)


def _randomise_bn(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def test_every_supported_op_is_rewritten_and_function_preserved():
    torch.manual_seed(0)
    model = _randomise_bn(AllOps())
    gm, rows = normalize(model)
    status = {r.node: r.status for r in rows}
    assert "unsupported" not in status.values()
    assert len(spiking_layers(gm)) == 6  # one slot per ReLU form
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in gm.modules())
    assert sum(isinstance(m, nn.BatchNorm1d) for m in gm.modules()) == 0  # folded into fc1
    assert any("folded into c1" in r.detail for r in rows)
    assert any("moved after the ReLU" in r.detail for r in rows)
    assert any(r.status == "removed" and "log_softmax" in r.op for r in rows)
    x = torch.rand(3, 2, 8, 8)
    with torch.no_grad():
        ref = model(x)
        out = gm(x)
    # the trailing log-softmax is dropped (monotone), so compare after applying it
    assert torch.allclose(F.log_softmax(out, 1), ref, atol=1e-5)


def test_batchnorm_folding_is_exact():
    torch.manual_seed(1)
    for model in (nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
                  nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6), nn.ReLU())):
        model = _randomise_bn(model)
        gm, _ = normalize(model)
        x = torch.randn(4, 3, 6, 6) if isinstance(model[0], nn.Conv2d) else torch.randn(4, 10)
        with torch.no_grad():
            assert torch.allclose(gm(x), model(x), atol=1e-6)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


def test_unsupported_node_stops_conversion_with_its_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(UserError, match=r"node '_1'.*Tanh.*train with ReLU"):
        normalize(model)


def test_maxpool_on_currents_without_relu_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(2, 2))
    with pytest.raises(UserError, match="max pool must follow a ReLU"):
        normalize(model)


def test_untraceable_model_gets_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UserError, match="cannot be traced"):
        normalize(Branchy())


def test_to_snn_fills_slots_with_neurons_and_gates_max_pools():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
    gm, _ = normalize(model)
    layers = spiking_layers(gm)
    snn = to_snn(gm, {name: IFNeuron(1.0) for name in layers})
    assert isinstance(gm.get_submodule(layers[0]), Slot)
    assert isinstance(snn.get_submodule(layers[0]), IFNeuron)
    assert any(isinstance(m, GatedMaxPool) for m in snn.modules())
    plain = to_snn(gm, {name: IFNeuron(1.0) for name in layers}, maxpool="spikes")
    assert not any(isinstance(m, GatedMaxPool) for m in plain.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in plain.modules())
    with pytest.raises(OptionError, match="^maxpool 'avg'"):
        to_snn(gm, {name: IFNeuron(1.0) for name in layers}, maxpool="avg")


def test_gated_max_pool_passes_the_most_active_unit():
    pool = GatedMaxPool(nn.MaxPool2d(2))
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # unit 0 spikes
    b = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])  # unit 1 spikes
    assert pool(a).item() == 1.0  # unit 0 leads: its spike passes
    assert pool(b).item() == 0.0  # unit 1 ties with 1 spike; the first (unit 0) still gates
    assert pool(b).item() == 1.0  # unit 1 now leads with 2 spikes
    pool.reset()
    assert pool(b).item() == 1.0


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_converts_exactly(name):
    shape = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28), "regression_mlp": (9,)}.get(name, (3, 32, 32))
    torch.manual_seed(0)
    model = _randomise_bn(resolve_model(name, {"in_channels": shape[0], "num_classes": 10, "input_size": shape[-1]}))
    gm, rows = normalize(model)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4)
    assert spiking_layers(gm)


def test_tiny_model_slots_are_in_execution_order():
    gm, _ = normalize(tiny_cnn())
    assert spiking_layers(gm) == ["act0", "act1"]


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "squeezenet1_0", "densenet121"])
def test_torchvision_models_convert_exactly(name):
    import torchvision

    torch.manual_seed(0)
    model = _randomise_bn(getattr(torchvision.models, name)(num_classes=10))
    gm, rows = normalize(model)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4)
    assert len(spiking_layers(gm)) == sum(r.status == "converted" for r in rows)


def test_torchvision_relu6_model_is_refused_with_a_hint():
    import torchvision

    with pytest.raises(UserError, match="ReLU6.*replace ReLU6 by ReLU"):
        normalize(torchvision.models.mobilenet_v2(num_classes=10))


def test_residual_network_with_batch_norm_and_max_pooling_converts_exactly():
    torch.manual_seed(0)
    model = _randomise_bn(resolve_model("resnet_small", {"in_channels": 1, "num_classes": 10, "input_size": 28,
                                                         "maxpool": True}))
    gm, rows = normalize(model)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4)
    assert any(r.status == "rewritten" and "max pool on spikes" in r.detail for r in rows)
    assert sum(r.detail.startswith("folded into") for r in rows) == 9  # every BN, shortcuts included
    snn = to_snn(gm, {name: IFNeuron(1.0) for name in spiking_layers(gm)})
    assert sum(isinstance(m, GatedMaxPool) for m in snn.modules()) == 1


@pytest.mark.parametrize("model", ["vgg16_bn", "resnet18"])
def test_deep_zoo_networks_convert_through_the_cli(run_cli, tmp_path, model):
    """Small random variants (width 8) of the CIFAR-style VGG-16 and ResNet-18: a one-step VSN
    with zero thresholds gives the ANN's answers exactly; IF runs the same network."""
    from safetensors.torch import save_file

    from ann2snn.io.zoo import resolve_model

    net = resolve_model(model, {"width": 8, "num_classes": 4}).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(x).argmax(1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    common = ["-m", model, "--model-arg", "width=8", "--model-arg", "num_classes=4"]
    for neuron, steps in (("vsn", 1), ("if", 16)):
        code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                               "--neuron", neuron, "-o", tmp_path / f"{neuron}.json")
        assert code == 0, err
        assert run_cli("convert", tmp_path / "w.safetensors", "-c", tmp_path / f"{neuron}.json",
                       "-o", tmp_path / f"{neuron}.snn")[0] == 0
        code, _, err = run_cli("evaluate", tmp_path / f"{neuron}.snn", "-d", tmp_path / "d.safetensors", "-T", steps,
                               "-r", tmp_path / f"rep_{neuron}", "--device", "cpu")
        assert code == 0, err
        report = json.loads((tmp_path / f"rep_{neuron}" / "report.json").read_text())
        assert report["ann"]["accuracy"] == 1.0  # labels are the ANN's answers
        if neuron == "vsn":
            assert report["snn"]["accuracy"] == 1.0 and len(report["layers"]) == (14 if model == "vgg16_bn" else 17)
