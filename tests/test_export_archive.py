"""torch.export archives (.pt2): read without torch's loader, so no string in one ever runs.

Each attack writes a marker file if any code of the archive ran; every case checks the marker is
absent and that the command either refuses in one line or converts the honest graph. The same
archive embedded in an SNN artifact (checksum recomputed, as an attacker would) is read by the
same reader."""

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import tiny_cnn
from test_hostile import _one_line_error


def _archive_bytes(model=None, example=(torch.zeros(2, 1, 8, 8),), **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model or tiny_cnn(), example, **kwargs), buf)
    return buf.getvalue()


def _rewrite(data: bytes, edit_model=None, extra: dict | None = None, replace: dict | None = None) -> bytes:
    """The archive with its model JSON edited, members replaced (by name ending) or added."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        top = src.namelist()[0].split("/")[0]
        for member in src.namelist():
            body = src.read(member)
            if member.endswith("models/model.json") and edit_model:
                model = json.loads(body)
                edit_model(model)
                body = json.dumps(model).encode()
            for ending, new in (replace or {}).items():
                if member.endswith(ending):
                    body = new
            dst.writestr(member, body)
        for name, body in (extra or {}).items():
            dst.writestr(f"{top}/{name}", body)
    return out.getvalue()


def _payload(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def _graph(model):
    return model["graph_module"]["graph"]


ATTACKS = {
    "guards_code": lambda m, code: m.__setitem__("guards_code", [code]),
    "range_constraint": lambda m, code: m["range_constraints"].__setitem__(
        "s0", {"min_val": 0, "max_val": None, "expr": code}),
    "sympify_size": lambda m, code: next(iter(_graph(m)["tensor_values"].values()))["sizes"].__setitem__(
        0, {"as_expr": {"expr_str": code, "hint": {"as_int": 2}}}),
    "operator_target": lambda m, code: _graph(m)["nodes"][0].__setitem__("target", "torch.os.system"),
    "load_library": lambda m, code: _graph(m)["nodes"][0].__setitem__("target", "torch.ops.load_library"),
    "operator_as_argument": lambda m, code: _graph(m)["nodes"][0]["inputs"].append(
        {"name": "x", "arg": {"as_operator": "torch.os.system"}, "kind": 1}),
    "graph_as_argument": lambda m, code: _graph(m)["nodes"][0]["inputs"].append(
        {"name": "x", "arg": {"as_graph": {"name": "g", "graph": {}}}, "kind": 2}),
    "custom_object_input": lambda m, code: m["graph_module"]["signature"]["input_specs"].insert(
        0, {"custom_obj": {"arg": {"name": "obj"}, "custom_obj_name": "obj"}}),
    "dunder_operator": lambda m, code: _graph(m)["nodes"][0].__setitem__("target", "torch.ops.aten.__class__.x"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_no_string_in_an_archive_runs(run_cli, tiny_files, attack):
    f = tiny_files
    marker = f["dir"] / "PWNED"
    evil = f["dir"] / "evil.pt2"
    evil.write_bytes(_rewrite(_archive_bytes(), lambda m: ATTACKS[attack](m, _payload(marker))))
    code, out, err = run_cli("calibrate", evil, "-d", f["data"], "-o", f["dir"] / "o.json")
    assert not marker.exists()
    assert "Traceback" not in out + err
    if attack in ("guards_code", "range_constraint", "sympify_size"):
        assert code == 0, err  # fields ann2snn never reads: the honest graph converts
    else:
        _one_line_error((code, out, err), "refused", absent=[f["dir"] / "o.json"])


def test_torch_loader_is_never_called(tiny_files, monkeypatch):
    from ann2snn.io.export_archive import read_export

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's loader was called")

    monkeypatch.setattr(torch.export, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = read_export(_archive_bytes())
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), tiny_cnn()(x))


def test_a_pickle_in_the_archive_is_never_read(run_cli, tiny_files):
    """Sample inputs are pickled; ann2snn does not need them and never opens them."""
    import pickle

    f = tiny_files
    marker = f["dir"] / "PWNED"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    evil = f["dir"] / "evil.pt2"
    evil.write_bytes(_rewrite(_archive_bytes(), replace={"sample_inputs/model.pt": pickle.dumps(Evil())}))
    assert run_cli("calibrate", evil, "-d", f["data"], "-o", f["dir"] / "o.json")[0] == 0
    assert not marker.exists()


def test_pickled_weights_are_refused_by_name(run_cli, tiny_files):
    f = tiny_files

    def edit_config(data):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
            config = json.loads(z.read(name))
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    data = _archive_bytes()
    evil = f["dir"] / "evil.pt2"
    evil.write_bytes(_rewrite(data, replace={"model_weights_config.json": edit_config(data)}))
    _one_line_error(run_cli("calibrate", evil, "-d", f["data"], "-o", f["dir"] / "o.json"),
                    "stored as a pickled Python object", absent=[f["dir"] / "o.json"])


@pytest.mark.parametrize("extra", ["data/aotinductor/model/model.wrapper.so", "models/model.JSON",
                                   "models/other.json"])
def test_members_a_plain_program_lacks_are_refused(run_cli, tiny_files, extra):
    f = tiny_files
    odd = f["dir"] / "odd.pt2"
    odd.write_bytes(_rewrite(_archive_bytes(), extra={extra: b"\x7fELF" if extra.endswith(".so") else b"{}"}))
    code, out, err = run_cli("calibrate", odd, "-d", f["data"], "-o", f["dir"] / "o.json")
    _one_line_error((code, out, err), "refused" if not extra.endswith("other.json") else "programs",
                    absent=[f["dir"] / "o.json"])


def test_a_duplicated_member_is_refused(run_cli, tiny_files):
    f = tiny_files
    data = _archive_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        names = src.namelist()
        for name in names:
            dst.writestr(name, src.read(name))
        with pytest.warns(UserWarning, match="Duplicate name"):
            dst.writestr(next(n for n in names if n.endswith(".json")), b"{}")
    dup = f["dir"] / "dup.pt2"
    dup.write_bytes(out.getvalue())
    _one_line_error(run_cli("calibrate", dup, "-d", f["data"], "-o", f["dir"] / "o.json"), "is ambiguous",
                    absent=[f["dir"] / "o.json"])


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(sizes=[{"as_int": 10 ** 9}], strides=[{"as_int": 1}]), "reaches past its data"),
    (lambda c: c.update(sizes=[{"as_int": 2}]), "differ in length"),
    (lambda c: c.update(dtype=99), "unsupported dtype"),
    (lambda c: c.update(sizes=[{"as_int": -4}], strides=[{"as_int": 1}]), "non-negative"),
])
def test_tensor_metadata_is_checked(run_cli, tiny_files, edit, match):
    f = tiny_files
    data = _archive_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(z.read(name))
    edit(next(iter(config["config"].values()))["tensor_meta"])
    bad = f["dir"] / "bad.pt2"
    bad.write_bytes(_rewrite(data, replace={"model_weights_config.json": json.dumps(config).encode()}))
    _one_line_error(run_cli("calibrate", bad, "-d", f["data"], "-o", f["dir"] / "o.json"), match,
                    absent=[f["dir"] / "o.json"])


def test_nan_weights_in_an_archive_are_refused(run_cli, tiny_files):
    f = tiny_files
    model = tiny_cnn()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    bad = f["dir"] / "nan.pt2"
    bad.write_bytes(_archive_bytes(model))
    _one_line_error(run_cli("calibrate", bad, "-d", f["data"], "-o", f["dir"] / "o.json"),
                    "NaN or infinite", absent=[f["dir"] / "o.json"])


@pytest.mark.parametrize("form", ["plain", "decomposed", "dynamic batch"])
def test_each_form_of_export_rebuilds_the_same_network(form):
    from ann2snn.io.export_archive import read_export

    kwargs = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}} if form == "dynamic batch" else {}
    program = torch.export.export(tiny_cnn(), (torch.zeros(2, 1, 8, 8),), **kwargs)
    if form == "decomposed":
        program = program.run_decompositions()
    buf = io.BytesIO()
    torch.export.save(program, buf)
    model = read_export(buf.getvalue())
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(model(x), tiny_cnn()(x), atol=1e-6)
    assert all(type(m).__name__ != "GraphModule" for m in model.children())


def test_an_artifact_embedding_a_crafted_archive_runs_nothing(run_cli, tiny_files):
    """The archive an artifact embeds goes through the same reader (the checksum is recomputed
    here, as an attacker can)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ann2snn.store.artifact import ARCHIVE_KEY, _digest

    f = tiny_files
    d = f["dir"]
    archive = d / "model.pt2"
    archive.write_bytes(_archive_bytes())
    assert run_cli("calibrate", archive, "-d", f["data"], "-o", d / "p.json", "--samples", 20)[0] == 0
    assert run_cli("convert", archive, "-c", d / "p.json", "-o", d / "snn.safetensors")[0] == 0
    with safe_open(str(d / "snn.safetensors"), framework="pt") as sf:
        header, tensors = sf.metadata(), {k: sf.get_tensor(k) for k in sf.keys()}
    marker = d / "PWNED"
    embedded = tensors[ARCHIVE_KEY].numpy().tobytes()
    evil = _rewrite(embedded, lambda m: ATTACKS["operator_as_argument"](m, _payload(marker)))
    tensors[ARCHIVE_KEY] = torch.frombuffer(bytearray(evil), dtype=torch.uint8)
    header["sha256"] = _digest(header["ann2snn"], tensors)
    save_file(tensors, str(d / "evil.safetensors"), metadata=header)
    for args in (["evaluate", d / "evil.safetensors", "-d", f["data"], "-T", 4, "-r", d / "rep"],
                 ["export", d / "evil.safetensors", "--format", "nir", "-o", d / "x.nir"]):
        _one_line_error(run_cli(*args), "refused", absent=[marker, d / "rep" / "report.json", d / "x.nir"])




@pytest.mark.parametrize("attack", ["keyword_name", "factory", "overload"])
def test_no_operator_outside_the_table_runs_and_no_name_becomes_code(run_cli, tiny_files, attack):
    """Found by a fresh hostile run: an argument's name pasted into fx's generated code, and a
    constant-only ATen call (aten.from_file) executed while the rebuilt graph was traced."""
    f = tiny_files
    marker = f["dir"] / "PWNED"
    victim = f["dir"] / "victim.txt"
    victim.write_text("CONTENT")
    placeholder = lambda m: m["graph_module"]["signature"]["input_specs"][-1]["user_input"]["arg"]["as_tensor"]["name"]

    def edit(model):
        x = placeholder(model)
        nodes = _graph(model)["nodes"]
        if attack == "keyword_name":
            nodes.insert(0, {"target": "torch.ops.aten.mul.Tensor", "name": "m", "outputs": [{"as_tensor": {"name": "m"}}],
                             "inputs": [{"name": "self", "arg": {"as_tensor": {"name": x}}, "kind": 1},
                                        {"name": f"**{{'a': __import__('os').system('touch {marker}')}}, other",
                                         "arg": {"as_float": 1.0}, "kind": 2}]})
        elif attack == "factory":
            nodes.insert(0, {"target": "torch.ops.aten.from_file.default", "name": "ff",
                             "outputs": [{"as_tensor": {"name": "ff"}}],
                             "inputs": [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                                        {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                                        {"name": "size", "arg": {"as_int": 4}, "kind": 1}]})
        else:
            nodes[0]["target"] = nodes[0]["target"].rsplit(".", 1)[0] + ".evil"

    evil = f["dir"] / "evil.pt2"
    evil.write_bytes(_rewrite(_archive_bytes(), edit))
    _one_line_error(run_cli("calibrate", evil, "-d", f["data"], "-o", f["dir"] / "o.json"),
                    "refused" if attack != "factory" else "from_file", absent=[f["dir"] / "o.json", marker])
    assert victim.read_text() == "CONTENT"


def test_argument_sizes_are_bounded(run_cli, tiny_files):
    f = tiny_files

    def edit(model):
        for node in _graph(model)["nodes"]:
            for entry in node["inputs"]:
                if entry["name"] == "eps":
                    entry["arg"] = {"as_float": 10 ** 400}

    bad = f["dir"] / "eps.pt2"
    bad.write_bytes(_rewrite(_archive_bytes(), edit))
    _one_line_error(run_cli("calibrate", bad, "-d", f["data"], "-o", f["dir"] / "o.json"), "sane size",
                    absent=[f["dir"] / "o.json"])


@pytest.mark.parametrize("edit", ["keyword", "hardtanh", "eps_string", "empty_weight"])
def test_second_hostile_run_archive_cases(run_cli, tiny_files, edit):
    f = tiny_files
    data = _archive_bytes()
    match = dict([("keyword", "is not a plain name"), ("hardtanh", "does not convert"),
                  ("eps_string", "not the kind it takes"), ("empty_weight", "an empty tensor")])[edit]
    replace = {}

    def change(model):
        nodes = _graph(model)["nodes"]
        relu = next(n for n in nodes if "relu" in n["target"])
        if edit == "keyword":
            relu["name"] = "class"
            relu["outputs"] = [{"as_tensor": {"name": "class"}}]
            for n in nodes:
                for entry in n["inputs"]:
                    if entry["arg"].get("as_tensor", {}).get("name") == "relu":
                        entry["arg"]["as_tensor"]["name"] = "class"
        elif edit == "hardtanh":
            relu["target"] = "torch.ops.aten.hardtanh.default"
            relu["inputs"] += [{"name": "min_val", "arg": {"as_float": 5.0}, "kind": 1},
                               {"name": "max_val", "arg": {"as_float": 1.0}, "kind": 1}]
        elif edit == "eps_string":
            for n in nodes:
                for entry in n["inputs"]:
                    if entry["name"] == "eps":
                        entry["arg"] = {"as_string": "x"}

    if edit == "empty_weight":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
            config = json.loads(z.read(name))
        next(iter(config["config"].values()))["tensor_meta"].update(sizes=[{"as_int": 2 ** 28}, {"as_int": 0}],
                                                                       strides=[{"as_int": 0}, {"as_int": 1}])
        replace = {"model_weights_config.json": json.dumps(config).encode()}
    bad = f["dir"] / "bad.pt2"
    bad.write_bytes(_rewrite(data, change, replace=replace))
    _one_line_error(run_cli("calibrate", bad, "-d", f["data"], "-o", f["dir"] / "o.json"), match,
                    absent=[f["dir"] / "o.json"])
