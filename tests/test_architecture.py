"""The contracts the package is built on: typed records read and written exactly, errors that
name the parameter, one neuron description object per type, reproducible files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ann2snn import neurons
from ann2snn.errors import OptionError, UserError
from ann2snn.neurons import Neuron
from ann2snn.options import CalibrationOptions, RunOptions
from ann2snn.store.profile import Profile, load_profile, save_profile
from ann2snn.neurons.readout import Readout
from ann2snn.io.records import from_json

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "calibration").glob("*.json"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_committed_profiles_read_and_write_back_byte_for_byte(path, tmp_path):
    profile = load_profile(path)
    assert isinstance(profile, Profile) and profile.layers and profile.layers[0].params
    save_profile(profile, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_a_broken_profile_names_the_key_at_fault(tmp_path):
    raw = json.loads(PROFILES[0].read_text())
    del raw["layers"][1]["params"]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"p.json: calibration profile: field 'layers\[1\].params' is missing"):
        load_profile(bad)
    raw = json.loads(PROFILES[0].read_text())
    raw["layers"][0]["neurons"] = "many"
    bad.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"field 'layers\[0\].neurons' must be int, not str"):
        load_profile(bad)
    raw["layers"][0]["neurons"] = True  # a bool is no count
    bad.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"field 'layers\[0\].neurons' must be int, not bool"):
        load_profile(bad)


def test_records_build_only_declared_types():
    from ann2snn.neurons.arousal_policy import ArousalPolicy

    policy = from_json(ArousalPolicy, {"low": 0.3, "recheck": [60, 90], "layers": ["act1"]}, "f")
    assert policy.recheck == (60, 90) and policy.layers == ("act1",) and policy.high == 0.1
    with pytest.raises(UserError, match=r"f: field '\(top level\)': needs 0 < high"):
        from_json(ArousalPolicy, {"low": 5.0}, "f")
    with pytest.raises(UserError, match=r"field 'recheck\[1\]' must be int"):
        from_json(ArousalPolicy, {"recheck": [60, "os:system"]}, "f")


def test_library_errors_name_parameters_and_the_cli_names_flags(run_cli, tiny_files):
    with pytest.raises(OptionError) as err:
        RunOptions(timesteps=-3)
    assert err.value.option == "timesteps" and str(err.value) == "timesteps -3: must be positive"
    with pytest.raises(OptionError) as err:
        RunOptions(timesteps=10, preset="3nm")
    assert err.value.option == "preset" and "--" not in str(err.value)
    with pytest.raises(OptionError, match="^budget -1: must be a positive"):
        CalibrationOptions(budget=-1)
    code, _, stderr = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d",
                              tiny_files["data"], "-o", tiny_files["dir"] / "p.json", "--budget", "-1")
    assert code == 2 and "ann2snn: error: --budget -1: must be a positive" in stderr
    code, _, stderr = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d",
                              tiny_files["data"], "-o", tiny_files["dir"] / "p.json", "--neuron", "asn",
                              "--param", "m_f=3")
    assert code == 2 and "ann2snn: error: --param m_f=3: must be in (0, 2)" in stderr


def test_every_registered_neuron_keeps_the_contract():
    for name, neuron in neurons.NEURONS.items():
        assert isinstance(neuron, Neuron) and neuron.name == name and neuron is neurons.get(name)
        assert "percentile" in neuron.defaults and neuron.spike_op in ("ac", "mac")
        assert isinstance(neuron.readout(neuron.defaults), Readout)
        assert set(neuron.readout_options) <= set(neuron.defaults)
        if neuron.precision is not None:
            assert neuron.precision.knob in neuron.defaults and neuron.precision.values
        control = neuron.precision_control
        if control is not None:  # the module built takes the policy field arousal sets
            assert hasattr(neuron.build(_params(neuron)), "set_precision")
    with pytest.raises(OptionError, match="^neuron 'lif': expected one of if, asn, vsn"):
        neurons.get("lif")


def _params(neuron: Neuron) -> dict:
    from ann2snn.conversion.statistics import LayerStats

    stats = LayerStats(neurons=4, max=2.0, percentile=1.5, sample=torch.linspace(0.01, 2, 50))
    return neuron.fit(stats, neuron.defaults)


TOY = '''"""A new neuron type, written as a user would: one file ending in NEURON = Neuron(...)."""
import torch

from ann2snn.neurons.layer import SpikingLayer, per_channel
from ann2snn.neurons.neuron import PERCENTILE, POSITIVE, Bound, Neuron, StepOps
from ann2snn.neurons.readout import Readout


class ToyLayer(SpikingLayer):
    """Integrate and fire, reset to zero: v += I; spike where v >= theta."""

    def __init__(self, threshold):
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32))

    def initial_state(self, current):
        return torch.zeros_like(current)

    def step(self, current):
        theta = per_channel(self.threshold, current)
        v = self.state + current
        self.spikes = (v >= theta).float()
        self.state = v * (1 - self.spikes)
        return self.spikes * theta


def fit(stats, options):
    return {"threshold": float(stats.percentile) if stats.percentile > 0 else 1.0}


NEURON = Neuron(name="toy", defaults={"percentile": 99.0}, fit=fit, build=lambda p: ToyLayer(p["threshold"]),
                readout=lambda options: Readout(tau=None, start=0), default_timesteps=16,
                bounds={"percentile": PERCENTILE, "threshold": POSITIVE},
                step_ops=StepOps(mac_per_step=0, add_per_step=2))
'''


def test_a_new_neuron_type_is_one_file_and_one_registry_line(run_cli, tiny_files, monkeypatch):
    """A neuron written in its own file and registered with one line appears in --help and goes
    through calibrate, convert, evaluate (and --compare), the Python API, the report and the NIR
    export's refusal, with no other change: nothing downstream looks a type up by its name."""
    import importlib.util

    f = tiny_files
    (f["dir"] / "toy_neuron.py").write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_neuron", f["dir"] / "toy_neuron.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    monkeypatch.setitem(neurons.NEURONS, "toy", toy.NEURON)  # the registry line
    register = (f"import sys; sys.path.insert(0, {str(f['dir'])!r}); import toy_neuron; from ann2snn import neurons; "
                "neurons.NEURONS['toy'] = toy_neuron.NEURON; from ann2snn.app.entry import main; "
                "sys.argv = ['ann2snn', 'calibrate', '--help']; main()")
    shown = subprocess.run([sys.executable, "-c", register], capture_output=True, text=True, env={
        "COLUMNS": "200", "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert shown.returncode == 0 and "toy" in shown.stdout, shown.stderr[-500:]
    profile, snn, report = f["dir"] / "toy.json", f["dir"] / "toy.snn.safetensors", f["dir"] / "rep"
    assert run_cli("calibrate", f["checkpoint"], "-m", "conftest:tiny_cnn", "-d", f["data"], "-o", profile,
                   "--neuron", "toy")[0] == 0
    assert json.loads(profile.read_text())["neuron"] == {"type": "toy", "options": {"percentile": 99.0}}
    assert run_cli("convert", "--trust-code", f["checkpoint"], "-c", profile, "-o", snn)[0] == 0
    code, out, err = run_cli("evaluate", "--trust-code", snn, "-d", f["data"], "-T", "8", "-r", report,
                             "--device", "cpu", "--compare", "if")
    assert code == 0, err
    rep = json.loads((report / "report.json").read_text())
    assert rep["neuron"] == "toy" and rep["label"] == "TOY" and rep["variants"][0]["label"] == "IF"
    assert rep["snn"]["spikes_per_sample"] > 0 and "TOY" in out
    assert set(rep["snn"]["backend"].values()) == {"reference"}  # no fused kernel: said so, not switched
    base, base_snn = f["dir"] / "if.json", f["dir"] / "if.snn.safetensors"
    assert run_cli("calibrate", f["checkpoint"], "-m", "conftest:tiny_cnn", "-d", f["data"], "-o", base)[0] == 0
    assert run_cli("convert", "--trust-code", f["checkpoint"], "-c", base, "-o", base_snn)[0] == 0
    code, out, err = run_cli("evaluate", "--trust-code", base_snn, "-d", f["data"], "-T", "4", "-r", f["dir"] / "rep2",
                             "--device", "cpu", "--compare", "toy")
    assert code == 0 and "TOY" in out, err
    code, _, err = run_cli("export", "--trust-code", snn, "--format", "nir", "-o", f["dir"] / "toy.nir")
    assert code == 2 and "the artifact's neurons are TOY; NIR has no node for them" in err
    import ann2snn
    from conftest import tiny_cnn

    x = torch.rand(6, 1, 8, 8)
    net = ann2snn.convert(tiny_cnn(), ann2snn.calibrate(tiny_cnn(), (x, tiny_cnn()(x).argmax(1)), neuron="toy"))
    assert ann2snn.evaluate(net, (x, tiny_cnn()(x).argmax(1)), timesteps=4).neuron == "toy"


def test_safetensors_files_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders its metadata by hash map, a new order in every process; ours is canonical."""
    code = ("import sys, torch; from ann2snn.io.files import write_safetensors; "
            "write_safetensors(sys.argv[1], {'w': torch.arange(6.).view(2, 3), 'b': torch.ones(2)}, "
            "{k: k * 2 for k in 'abcdef'})")
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, cwd=ROOT)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    from safetensors import safe_open

    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {k: k * 2 for k in "abcdef"} and f.get_tensor("w")[1, 2] == 5


# The house: a layout that reads like the product ------------------------------------------------

PACKAGE = ROOT / "ann2snn"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source (under TYPE_CHECKING and
    inside functions too)."""
    import ast

    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_module_imports_in_a_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(other):] + [name, other]))
            if other not in state:
                visit(other, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_top_level_holds_few_modules_and_no_function_is_long():
    import ast

    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_no_layer_capability_is_probed_by_name():
    """Spiking layers are ``neurons.layer`` types: nothing asks a module whether it has a method."""
    import re

    probe = re.compile(r"""(hasattr|getattr)\([^,]+,\s*["'](reset|spikes|scan|set_precision|graded_events|"""
                       r"""trained_params|threshold|backend|state)["']""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert not hits, hits
