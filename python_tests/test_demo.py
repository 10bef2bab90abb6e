"""The demo end to end at a small scale, and the validity check that its sub-architectures
keep their task."""
import json

import pytest

from nad_ext import analysis, data, models
from nad_ext import demo
from nad_ext.demo import DEMO_CALIBRATION, run_demo
from nad_ext.training import NADConfig, Network, build_gated_model, disentangle


@pytest.mark.slow
def test_subarchitectures_keep_their_task(tmp_path):
    train = data.generated_shapes("train", images_per_class=80)
    val = data.generated_shapes("val", images_per_class=30)
    model, accuracy = models.train_zoo_model("zoo_plain", train, val, epochs=6, progress=False)
    assert accuracy > 0.6  # the network has learnt the classes
    bank = disentangle(Network(model, "zoo_plain", "zoo_plain"), train, progress=False,
                       config=NADConfig(beta=1.0, epochs=8, image_size=64, tasks_per_step=10))
    gated = build_gated_model(model, [p.name for p in bank.gate_points], len(bank.tasks), 64, model_id="zoo_plain")
    result = analysis.masked_accuracy(gated, bank, val, 64)
    mean = result["mean"]
    # Sparse (not every channel kept) and still solving its task close to the original network.
    assert bank.open_ratio().mean() < 0.9
    assert mean["own_class_accuracy"] >= mean["original_own_class_accuracy"] - 0.15, mean


@pytest.mark.slow
def test_demo_writes_banks_analyses_summary_and_report(tmp_path):
    summary = run_demo(tmp_path / "out", cache_dir=tmp_path / "cache", epochs=1, num_mosaics=4,
                       networks=["zoo_dense"], images_per_class=(16, 8), zoo_epochs=1, progress=False)
    out = tmp_path / "out"
    assert (out / "zoo_dense" / "masks.safetensors").is_file()
    assert (out / "zoo_dense" / "results.json").is_file()
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    html = (out / "report.html").read_text()
    assert "zoo_dense" in html and 'src="data:image/png;base64,' in html
    s = summary["zoo_dense"]
    assert len(s["open_ratio_per_gate_point"]) == len(s["gate_points"])
    assert len(s["per_task"]) == 10
    assert s["open_channels_weighted"] == pytest.approx(
        sum(r * c for r, c in zip(s["open_ratio_per_gate_point"], s["channels"])) / sum(s["channels"]))
    # The zoo is cached: a second run loads it instead of training again.
    assert (tmp_path / "cache" / "zoo_dense.safetensors").is_file()


@pytest.mark.slow
def test_demo_disentangles_the_transformer_with_a_calibrated_beta(tmp_path):
    summary = run_demo(tmp_path / "out", cache_dir=tmp_path / "cache", epochs=1, num_mosaics=4,
                       networks=["zoo_vit"], images_per_class=(16, 8), zoo_epochs=1, progress=False)
    s = summary["zoo_vit"]
    assert s["connection"] == "transformer" and len(s["gate_points"]) == 3
    cal = s["beta_calibration"]
    assert s["beta"] == cal["beta"] and 2 <= cal["runs"] <= DEMO_CALIBRATION.runs and len(cal["tasks"]) == 2
    assert len(s["mean_hit_rate_per_gate_point"]) == 3  # tokens map to the patch grid
    assert all(h is not None for h in s["mean_hit_rate_per_gate_point"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "zoo_vit" in html


def _row(task, balanced, original, own=None, fp=None):
    return {"task": task, "balanced_accuracy": balanced, "original_balanced_accuracy": original,
            "own_class_accuracy": own if own is not None else balanced, "false_positive_rate": fp or 0.0}


def test_weakest_task_breaks_ties_by_the_original_network_and_says_when_all_tie():
    rows = [_row("a", 0.9, 0.95), _row("b", 0.7, 0.99), _row("c", 0.8, 0.5)]
    assert demo._weakest_task(rows).startswith("weakest task: b: balanced accuracy 70.0% (original network 99.0%)")
    rows = [_row("a", 0.5, 0.95, 1.0, 1.0), _row("b", 0.5, 0.90, 1.0, 1.0), _row("c", 0.5, 0.97, 1.0, 1.0)]
    line = demo._weakest_task(rows)
    assert line.startswith("weakest task: b (3 tasks tie at balanced accuracy 50.0%, so the tie goes to the "
                           "original network's weakest: 90.0%)")
    assert "own-class accuracy 100.0%, false positives on other classes 100.0%" in line
    assert demo._weakest_task([_row(t, 0.5, 0.5) for t in "abc"]) == (
        "all 3 tasks tie: balanced accuracy 50.0% (original network 50.0%)")


def test_summary_names_the_measures_and_one_open_channel_ratio(capsys):
    summary = {"channels": [10, 30], "open_channels_weighted": 0.175, "open_ratio_per_gate_point": [0.1, 0.2],
               "per_task": [_row("a", 0.5, 0.9, 1.0, 1.0), _row("b", 0.75, 0.9, 0.5, 0.0)],
               "mean_over_tasks": {"own_class_accuracy": 0.75, "false_positive_rate": 0.5, "balanced_accuracy": 0.625,
                                   "original_own_class_accuracy": 0.9, "original_false_positive_rate": 0.1,
                                   "original_balanced_accuracy": 0.9}}
    demo._print_summary(summary, explain=True)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "open channels (weighted by channels): 17.5% of 40 (mean over 2 tasks)" in out
    header = next(line for line in lines if "own-class accuracy" in line and "false positives on other classes" in line)
    assert "balanced accuracy" in header
    original = next(line for line in lines if line.strip().startswith("original network"))
    assert original.split()[2:] == ["90.0%", "10.0%", "90.0%"]
    weakest = next(line for line in lines if "weakest task" in line)
    assert weakest.strip().startswith("weakest task: a:") and "open" not in weakest
    assert any(line.strip().startswith("(own-class accuracy: ") for line in lines)


def test_demo_settings_of_each_objective():
    from nad_ext.training import SELECTIVE_DEFAULTS

    assert demo.demo_settings("zoo_plain") == {"beta": 4.5, "lr": NADConfig.lr}  # METHOD.md's lr
    assert demo.demo_settings("zoo_residual") == {"beta": 0.02, "lr": 0.1}
    selective = demo.demo_settings("zoo_plain", selective=True)
    assert selective == {"beta": 0.1, "lr": 0.2, **SELECTIVE_DEFAULTS}
    assert demo.demo_settings("zoo_nas", selective=True)["beta"] == demo.DEMO_BETAS["zoo_nas"]
    NADConfig(**selective).validate()
