"""The operating point calibrate picks by itself: the bar, the per-step output error, the choice."""

import json
import math

import pytest
import torch

from ann2snn.search.budget import OutputError
from ann2snn.neurons.asn import OPERATING_POINTS
from ann2snn.search.operating_point import MARGINS, bars, cost, fallback, late_error, reached, setting_text, settled


def test_settled_is_the_first_step_from_which_the_error_stays_below_the_bar():
    error = torch.tensor([5.0, 3.0, 1.0, 2.0, 0.5, 0.4])
    assert settled(error, 1.0) == 4  # step index 2 dips below, index 3 rises again
    assert settled(error, 10.0) == 0
    assert settled(error, 0.45) == 5  # only the last value is below
    assert settled(torch.tensor([3.0, 0.1]), 0.45) == 1


def test_output_error_per_step_is_the_error_after_the_best_gain():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    scores = torch.randn(3, 10, 4, generator=gen, dtype=torch.float64)  # [T, N, C]
    scores[2] = 2.5 * ref  # a scaled copy of the ANN's outputs: no error left after the gain
    observer = OutputError(ref, 3)
    for start, stop in ((0, 6), (6, 10)):  # two batches, in order
        observer.reset(stop - start, torch.device("cpu"))
        for t in range(3):
            observer(t, scores[t, start:stop])
    for t in range(2):
        s = scores[t].reshape(-1)
        a = float(s @ ref.reshape(-1)) / float(s @ s)
        want = float(((a * scores[t] - ref) ** 2).sum() / ((ref - ref.mean(0)) ** 2).sum())
        assert abs(float(observer.per_step()[t]) - want) < 1e-9
    assert float(observer.per_step()[2]) < 1e-12 and observer.relative() < 1e-12


def test_reached_cost_and_fallback_follow_the_bars():
    error = torch.tensor([0.5, 0.02, 0.004, 0.002, 0.0009, 0.0008])
    spikes = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    base = reached(error, spikes, [0.003, 0.001])
    assert base == {"settled_steps": [4, 5], "spikes_by_then": [40.0, 50.0]}
    cheap = {"settled_steps": [2, 5], "spikes_by_then": [20.0, 45.0]}  # 0.5 and 0.9 of the baseline's
    assert cost(cheap, base) == 0.9 and cost(cheap, base, bars=1) == 0.5
    assert cost(cheap, base, by=4) is None and cost(cheap, base, by=5) == 0.9  # within from step 5: too late for 4
    assert cost({"settled_steps": [2, None], "spikes_by_then": [20.0, None]}, base) is None
    short = {**reached(error, spikes, [0.003, 0.0001]), "spikes_per_sample": 60.0}  # never within the second bar
    assert short["settled_steps"] == [4, None]
    assert cost(cheap, short) == 45.0 / 60.0  # its whole run's spikes stand in where it never gets there

    def row(name, steps, spent, final):
        return {"name": name, "settled_steps": steps, "spikes_by_then": spent, "final_error": final,
                "spikes_per_sample": 99.0}
    one_bar = [row("a", [3, None], [30.0, None], 0.002), row("b", [3, None], [24.0, None], 0.0025),
               row("c", [None, None], [None, None], 0.0001)]
    assert fallback(one_bar, base)["name"] == "b"  # within the loosest bar, cheaper than a
    late = one_bar + [row("d", [150, 160], [60.0, 70.0], 0.001)]
    assert fallback(late, base)["name"] == "d"  # within both bars, if only late in its run
    none = [dict(t, settled_steps=[None, None], spikes_by_then=[None, None]) for t in one_bar]
    assert fallback(none, base)["name"] == "c"  # within no bar: the least final error


def test_the_bars_are_the_margins_raised_to_the_best_any_run_does():
    assert late_error(torch.tensor([0.9, 0.5, 0.02, 0.04, 0.01], dtype=torch.float64)) == 0.04  # worst of the last three steps
    assert bars((0.3, 0.1), 0.0005, 0.0004, 2000) == [0.003, 0.001]  # IF gets below both margins
    assert bars((0.3, 0.1), 0.002, 0.004, 2000) == [0.003, 0.002]  # IF's final disagreement raises the tight one
    # IF ends far off (5%); a candidate holds 1% over its second half: its level plus one standard error
    want = 0.01 + math.sqrt(0.01 * 0.99 / 2000)
    assert bars((0.3, 0.1), 0.05, 0.01, 2000) == [want, want]
    assert bars((0.3, 0.1), 0.011, 0.01, 2000) == [0.011, 0.011]  # IF is within that standard error: its own
    # the best candidate's level counts with its standard error: 0.08% on 2,000 images is 0.08% +- 0.063%,
    # so the 0.1% margin is raised to 0.143% (a bar at the best's own level would pass only the luckiest)
    assert bars((0.3, 0.1), 0.005, 0.0008, 2000) == [0.003, 0.0008 + math.sqrt(0.0008 * 0.9992 / 2000)]
    assert bars((0.3, 0.1), 0.005, 0.0001, 2000) == [0.003, 0.001]  # clearly within the margin: kept
    # a run at 0.25% +- 0.11% is not known to be within 0.3% on 2,000 images: both bars 0.36%
    assert bars((0.3, 0.1), 0.05, 0.0025, 2000) == [0.0025 + math.sqrt(0.0025 * 0.9975 / 2000)] * 2


def test_calibrate_asn_picks_the_cheapest_candidate_within_the_if_bars(run_cli, tiny_files):
    d = tiny_files["dir"]
    code, out, err = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                             "--neuron", "asn", "--samples", 40, "--search-samples", 30, "-o", d / "a.json")
    assert code == 0, err
    profile = json.loads((d / "a.json").read_text())
    record = profile["operating_point"]
    base = record["baseline"]
    assert base["neuron"] == "if" and base["timesteps"] == 64 and base["measure"] == "disagreement"
    # statistics on the 40 calibration images, the choice on 30 of them drawn at random
    assert len(record["candidates"]) == len(OPERATING_POINTS) and record["samples"] == 30
    assert profile["data"]["samples"] == 40
    best = min(c["late_error"] for c in record["candidates"])
    assert base["bars"] == bars(MARGINS, base["final_error"], best, 30)
    # IF agrees with the ANN on every search image (the labels are the ANN's), so the bars are the margins,
    # and each allows none of the 30 images to disagree: calibrate says so, with the set that would allow 3
    assert base["bars"] == [0.003, 0.001]
    said = " ".join(out.split())  # as printed, unwrapped
    assert ("(the 0.3% bar allows 0 of these 30 images to disagree: which setting stays within it rests on an image "
            "or two; at this bar 1,000 search images would allow 3: raise --samples and --search-samples)") in said
    assert "(the 0.1% bar allows 0 of these 30 images to disagree" in said and "at this bar 3,000 search images" in said
    for c in record["candidates"]:
        assert len(c["settled_steps"]) == len(c["spikes_by_then"]) == len(MARGINS)
        for step, spent in zip(c["settled_steps"], c["spikes_by_then"]):
            assert (step is None) == (spent is None)
            assert step is None or spent <= c["spikes_per_sample"] + 1e-9
        # a cost only for a candidate within every bar from the first half of its run on
        early = all(step is not None and step <= record["timesteps"] // 2 + 1 for step in c["settled_steps"])
        assert (c["cost"] is not None) == early
    cands = record["candidates"]
    for c in cands:  # the cost, recomputed: the worst ratio of spikes to IF's over the bars
        if c["cost"] is not None:
            ifs = [y if y is not None else base["spikes_per_sample"] for y in base["spikes_by_then"]]
            assert c["cost"] == max(x / y for x, y in zip(c["spikes_by_then"], ifs))
    met = [c for c in cands if c["cost"] is not None]
    late = [c for c in cands if None not in c["settled_steps"]]
    loosest = [c for c in cands if c["settled_steps"][0] is not None]
    if met:
        want = min(met, key=lambda c: (c["cost"], c["final_error"]))
    elif late or loosest:  # the cheapest within every bar late, else within the loosest bar
        pool, n = (late, 2) if late else (loosest, 1)
        want = min(pool, key=lambda c: (cost(c, base, bars=n), c["final_error"]))
    else:
        want = min(cands, key=lambda c: (c["final_error"], c["spikes_per_sample"]))
    assert record["chosen"] == want and record["bar_met"] == bool(met)
    options = profile["neuron"]["options"]
    assert all(options[k] == want[k] for k in OPERATING_POINTS[0])
    assert "operating point" in out

    code, out, err = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                             "--neuron", "asn", "--samples", 40, "--param", "m_f=0.2", "-o", d / "b.json")
    assert code == 0, err
    named = json.loads((d / "b.json").read_text())
    assert "operating_point" not in named and named["neuron"]["options"]["m_f"] == 0.2
    assert named["neuron"]["options"]["tau_gamma"] == 15.0  # the paper's value when the user names m_f
    assert named["neuron"]["options"]["onset_ms"] == 0.0 and named["neuron"]["options"]["scale"] == "fit"


def test_search_samples_beyond_the_calibration_images_are_refused(run_cli, tiny_files):
    d = tiny_files["dir"]
    code, out, err = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                             "--neuron", "asn", "--samples", 40, "--search-samples", 50, "-o", d / "c.json")
    assert code == 2 and not (d / "c.json").exists()
    assert err.strip().splitlines() == ["ann2snn: error: --search-samples 50: more than the 40 calibration images "
                                        "(raise --samples, or the data set has no more)"]


def test_a_bar_of_a_few_images_is_flagged_with_the_search_set_that_would_steady_it():
    from ann2snn.search.operating_point import few_image_bars
    from ann2snn.store.profile import OperatingPointRecord

    def record(samples: int, bars: list[float]) -> OperatingPointRecord:
        return OperatingPointRecord(baseline={"margins": list(MARGINS), "bars": bars}, timesteps=200, samples=samples,
                                    candidates=[], chosen={}, bar_met=True)

    assert few_image_bars(record(2000, [0.003, 0.001])) == [(0.001, 2, 3000)]  # 0.1% of 2,000 is 2 images
    assert few_image_bars(record(4000, [0.003, 0.001])) == []  # 4 and 12 images
    assert few_image_bars(record(2000, [0.003, 0.0017])) == []  # a raised bar: 3 images
    assert few_image_bars(record(2000, [0.003, 0.0013])) == [(0.0013, 2, 2400)]  # 3 / 0.13% = 2,308, two digits up
    assert few_image_bars(record(500, [0.003, 0.001])) == [(0.003, 1, 1000), (0.001, 0, 3000)]
    assert few_image_bars(record(40, [0.05, 0.05])) == [(0.05, 2, 60)]  # both margins raised to one bar: once
    regression = OperatingPointRecord(baseline={"margins": None, "bars": [0.01]}, timesteps=200, samples=10,
                                      candidates=[], chosen={}, bar_met=True)
    assert few_image_bars(regression) == []  # an output-error bar counts no images


def test_the_search_images_are_drawn_at_random_from_the_calibration_subset():
    from ann2snn.io.data import TensorData
    from ann2snn.errors import OptionError
    from ann2snn.app.pipeline import search_set

    sorted_by_class = TensorData("sorted", "file", torch.rand(100, 1, 4, 4), torch.arange(10).repeat_interleave(10), 10)
    picked = search_set(sorted_by_class, 20, 400_000, 200, seed=0)
    assert len(picked) == 20 and len(set(picked.targets.tolist())) >= 6  # the first 20 would be classes 0 and 1
    again = search_set(sorted_by_class, 20, 400_000, 200, seed=0)
    assert torch.equal(picked.inputs, again.inputs)  # the same seed, the same images
    assert search_set(sorted_by_class, None, 400_000, 200, seed=0) is sorted_by_class  # 2,000 >= 100: all of them
    assert search_set(sorted_by_class, None, 256_000, 4000, seed=0) is sorted_by_class  # at least 256: all 100
    with pytest.raises(OptionError, match="more than the 100 calibration images"):
        search_set(sorted_by_class, 101, 400_000, 200, seed=0)


def test_search_samples_where_nothing_is_searched_are_refused(run_cli, tiny_files):
    d = tiny_files["dir"]
    code, out, err = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                             "--samples", 40, "--search-samples", 30, "-o", d / "if.json")
    assert code == 2 and not (d / "if.json").exists()
    assert err.strip().splitlines() == ["ann2snn: error: --search-samples 30: nothing is searched here (it sets the "
                                        "images of a --budget search or of the operating point ASN or TTFS chooses "
                                        "when no precision option is named)"]


def test_a_setting_reads_as_options_with_unset_ones_left_out():
    assert setting_text({"m_f": 0.3, "tau_gamma": 2.0, "theta0": None, "tau_eta": 50.0}) == "m_f=0.3 tau_gamma=2 tau_eta=50"
    assert setting_text({"scale": "fit", "bias_ramp": True, "m_f": 0.01}) == "scale=fit bias_ramp=True m_f=0.01"


def test_onset_layers_input_ramps_the_first_layer_only_through_calibrate_convert_and_sweep(run_cli, tiny_files):
    d, T = tiny_files["dir"], 20
    code, _, err = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                           "--neuron", "asn", "--samples", 40, "--param", "m_f=0.01", "--param", "theta0=1",
                           "--param", "scale=4", "--param", "onset_ms=4", "--param", "onset_layers=input", "-o", d / "p.json")
    assert code == 0, err
    profile = json.loads((d / "p.json").read_text())
    assert [layer["stats"]["analog_input"] for layer in profile["layers"]] == [True, False]  # conv, then fc1
    assert [layer["params"]["onset_ms"] for layer in profile["layers"]] == [4.0, 0.0]
    units = [layer["neurons"] for layer in profile["layers"]]

    def swept_macs(name: str) -> float:
        """Convert the profile ``name``.json, evaluate it with --sweep onset_ms=8: the variant's multiplies."""
        code, _, err = run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / f"{name}.json",
                               "-o", d / f"{name}.snn.safetensors")
        assert code == 0, err
        code, _, err = run_cli("evaluate", "--trust-code", d / f"{name}.snn.safetensors", "-d", tiny_files["data"],
                               "-T", T, "-r", d / f"rep_{name}", "--sweep", "onset_ms=8")
        assert code == 0, err
        report = json.loads((d / f"rep_{name}" / "report.json").read_text())
        return report["variants"][0]["snn"]["neuron_updates_per_sample"]["mac"]

    # the swept onset goes to the input layer only, and only its units pay the ramp's multiply
    assert swept_macs("p") == sum(units) * T * 6 + units[0] * 7

    # a sweep swaps the onset in and keeps the fit: every scale stays the calibrated one
    from ann2snn.store.artifact import load_artifact, variant
    from ann2snn.neurons import asn

    meta = load_artifact(d / "p.snn.safetensors", trust_code=True).meta
    for overrides, onsets in (({"onset_ms": 0.0}, [0.0, 0.0]), ({"onset_ms": 6.0}, [6.0, 0.0]),
                              ({"onset_layers": "all"}, [4.0, 4.0])):
        _, layers = variant(meta, asn.NEURON, None, overrides)
        assert [layer.params["scale"] for layer in layers] == [layer.params["scale"] for layer in meta.layers]
        assert [layer.params["onset_ms"] for layer in layers] == onsets, overrides
    # a sweep's options go over the artifact's: "input" on an artifact that ramps every layer (onset 4)
    # is the input ramp; on one without a ramp it would do nothing and is refused
    from dataclasses import replace

    from ann2snn.errors import UserError

    every = replace(meta, neuron=replace(meta.neuron, options={**meta.neuron.options, "onset_layers": "all"}))
    _, layers = variant(every, asn.NEURON, None, {"onset_layers": "input"})
    assert [layer.params["onset_ms"] for layer in layers] == [4.0, 0.0]
    flat = replace(meta, neuron=replace(meta.neuron, options={**every.neuron.options, "onset_ms": 0.0}))
    with pytest.raises(UserError, match="onset_layers=input places the onset_ms ramp"):
        variant(flat, asn.NEURON, None, {"onset_layers": "input"})
    for layer in profile["layers"]:  # a profile written before the flag: the artifact's graph tells
        del layer["stats"]["analog_input"]
    (d / "old.json").write_text(json.dumps(profile))
    assert swept_macs("old") == sum(units) * T * 6 + units[0] * 7


def test_calibrate_prints_a_bar_if_never_reaches_and_the_candidate_that_set_it(monkeypatch):
    from rich.console import Console

    from ann2snn.app import cli
    from ann2snn.store.profile import OperatingPointRecord

    console = Console(record=True, width=300)
    monkeypatch.setattr(cli, "console", console)
    limit = bars(MARGINS, 0.05, 0.01, 2000)  # IF ends at 5%, a candidate holds 1%: raised to 1.22%
    base = {"neuron": "if", "timesteps": 64, "margins": list(MARGINS), "bars": limit, "final_error": 0.05,
            "spikes_per_sample": 100.0, "settled_steps": [None, None], "spikes_by_then": [None, None]}
    chosen = {"scale": 32.0, "final_error": 0.01, "late_error": 0.01, "spikes_per_sample": 60.0,
              "settled_steps": [30, 30], "spikes_by_then": [40.0, 40.0]}
    chosen["cost"] = cost(chosen, base)
    assert chosen["cost"] == 0.4  # against IF's whole run, where it never gets within
    far = {**chosen, "scale": 8.0, "final_error": 0.04, "late_error": 0.045, "settled_steps": [None, None],
           "spikes_by_then": [None, None], "cost": None}
    cli._print_operating_point(OperatingPointRecord(baseline=base, timesteps=200, samples=2000,
                                                    candidates=[far, chosen], chosen=chosen, bar_met=True))
    out = console.export_text()
    assert "<= 1.2% never; <= 1.2% never" in out  # IF never within the raised bars
    assert "the best candidate's disagreement over the second half" in out
    assert "scale=8 " in out and "misses a bar" in out and "late_error" not in out
    assert "from step 30 (40 spikes)" in out and "0.40 x IF's spikes <- chosen" in out
    assert "is the cheaper SNN" not in out
    # a choice dearer than IF is said to be so
    console = Console(record=True, width=300)
    monkeypatch.setattr(cli, "console", console)
    dear = {**chosen, "cost": 1.04}
    cli._print_operating_point(OperatingPointRecord(baseline=base, timesteps=200, samples=2000,
                                                    candidates=[far, dear], chosen=dear, bar_met=True))
    out = console.export_text()
    assert "1.04 x IF's spikes <- chosen" in out
    assert "spends more spikes than IF at its defaults on these images (the cheapest 1.04 times)" in out


def test_the_race_halves_the_candidates_carries_totals_and_keeps_the_full_search_choice(monkeypatch):
    """Successive halving: 10 candidates on 16 images, the better half (and the bar's candidate)
    on twice as many, two on all 96; the survivors' totals equal one pass over all the images,
    and the choice is the full search's."""
    from conftest import tiny_labelled
    from ann2snn import neurons
    from ann2snn.conversion.statistics import activation_stats
    from ann2snn.search import operating_point, race

    gm, data = tiny_labelled(96, 3)
    stats = activation_stats(gm, data, 99.9, 64, "cpu")
    asn = neurons.get("asn")
    cpu = torch.device("cpu")
    assert race.rounds(96) == [96] and race.rounds(600) == [256, 512, 600] and race.rounds(600, True) == [600]
    monkeypatch.setattr(race, "FIRST", 16)  # rounds of 16, 32, 64 and 96 images
    raced_options, raced = operating_point.choose(gm, stats, asn, asn.options({}), neurons.BASELINE, data, 32, cpu)
    images = [c["images"] for c in raced.candidates]
    alive = [sum(n >= r for n in images) for r in (16, 32, 64, 96)]  # candidates in each round
    assert alive[0] == 10 and all(math.ceil(a / 2) <= b <= max(2, math.ceil(a / 2)) + 1 for a, b in zip(alive, alive[1:]))
    assert 2 <= alive[-1] <= 3
    assert all(c["cost"] is None for c in raced.candidates if c["images"] < 96)
    monkeypatch.setattr(race, "FIRST", 10 ** 6)  # one round: every candidate on every image
    full_options, full = operating_point.choose(gm, stats, asn, asn.options({}), neurons.BASELINE, data, 32, cpu)
    assert all(c["images"] == 96 for c in full.candidates)
    assert raced_options == full_options and raced.chosen == full.chosen and raced.baseline == full.baseline
    for r, f in zip(raced.candidates, full.candidates):
        if r["images"] == 96:  # carried from round to round: the same totals as one pass
            assert r == f
