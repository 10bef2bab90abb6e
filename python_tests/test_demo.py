"""The demo end to end at a small scale, and the validity check that its sub-architectures
keep their task."""
import json

import pytest

from nad_ext import analysis, data, models
from nad_ext import demo, path_study
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
                       networks=["zoo_dense"], images_per_class=(16, 8), zoo_epochs=1, progress=False, paths=True)
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
    # --paths: every validation image's path, beside the analyses and in the report.
    found = json.loads((out / "zoo_dense" / "paths.json").read_text())
    assert found["images"] == 80 and found["attack"]["images"] == 80
    assert s["paths"]["top1_label"] == found["path_to_class"]["top1_label"] and s["paths"]["chance_top1"] == 0.1
    assert "Per-image paths" in html and "(d) detector ROC AUC" in html
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


# ------------------------------------------------------------------------------------------
# Per-image paths (nad demo --paths): analyze_paths on a hand-made network whose classes are colours


def _colour_network_and_bank():
    from test_analysis import POINTS, ColourNet, own_channel_bank

    return Network(ColourNet(), POINTS, "colour"), own_channel_bank()


def _tiny_path_settings():
    from test_analysis import SIZE

    from nad_ext.training import PathSettings

    return PathSettings(beta=0.5, steps=2, views=2, init_std=0.01, image_size=SIZE, device="cpu", data_pipeline="exact")


@pytest.fixture(scope="module")
def colour_paths():
    import torch

    from test_analysis import colour_set

    torch.set_num_threads(1)
    network, bank = _colour_network_and_bank()
    return path_study.analyze_paths(network, bank, colour_set(), settings=_tiny_path_settings(), eps=0.3, progress=False)


def _in_unit(value):
    return value is None or 0.0 <= value <= 1.0


def test_analyze_paths_gives_every_analysis_with_its_baseline(colour_paths):
    found = colour_paths
    assert json.loads(json.dumps(found)) == found  # JSON-friendly as it is
    assert set(found) == {"images", "settings", "path_to_class", "misclassified", "layerwise", "attack",
                          "attacked_path_to_class", "detector", "status", "seconds", "notes"}
    assert found["images"] == 20 and found["settings"]["target"] == "prediction"
    assert found["settings"]["steps"] == 2 and found["settings"]["beta"] == 0.5
    a = found["path_to_class"]
    assert a["chance"] == {"top1": 0.25, "topk": 1.0} and a["k"] == 4 and a["classes"] == 4
    for key in ("top1_label", "top1_prediction", "topk_label", "topk_prediction"):
        assert _in_unit(a[key]) and _in_unit(a["permuted"][key])
    b = found["misclassified"]
    assert b["chance"] == 0.5 and _in_unit(b["share_closer_to_prediction"]) and b["misclassified"] >= 0
    c = found["layerwise"]
    assert [r["gate_point"] for r in c["per_gate_point"]] == ["relu1", "relu2", "pool"]
    assert c["chance"] == 0.25 and all(_in_unit(r["top1_label"]) for r in c["per_gate_point"])
    attack = found["attack"]
    assert attack["method"] == "fgsm" and attack["eps"] == 0.3 and attack["images"] == 20
    assert attack["accuracy_clean"] == 1.0  # the colour network is right on every clean image
    assert _in_unit(attack["accuracy_attacked"]) and 0 <= attack["flipped"] <= 20
    assert set(found["detector"]) == {"all", "flipped", "not_flipped"}
    for d in found["detector"].values():
        assert d is None or (0.0 <= d["auc"] <= 1.0 and d["chance"] == 0.5 and d["attacked"] >= 1)
    for what in ("clean", "attacked"):
        assert sum(found["status"][what].values()) == 20
    assert found["detector"]["all"]["attacked"] == found["status"]["attacked"]["ok"]
    assert found["detector"]["all"]["clean"] == found["status"]["clean"]["ok"]
    assert set(found["seconds"]) == {"clean_paths", "analyses", "attack", "attacked_paths"}
    # The colour network routes each colour through its own channels: paths find their class,
    # and a strong attack (eps 0.3) moves paths away from every class.
    assert a["top1_label"] > 0.5 and attack["accuracy_attacked"] < 1.0 and found["detector"]["all"]["auc"] > 0.5
    line = demo.paths_line(found)
    assert "chance 25.0%" in line and "detector AUC" in line and "FGSM" in line


def test_analyze_paths_in_bfloat16_leaves_the_network_in_float32():
    # The GPU's default precision, run here on the CPU: clean paths, then the attack on the
    # network itself, then the attacked paths (each of the two runs gates its own copy).
    import dataclasses

    import torch

    from test_analysis import colour_set

    torch.set_num_threads(1)
    network, bank = _colour_network_and_bank()
    settings = dataclasses.replace(_tiny_path_settings(), precision="bfloat16")
    found = path_study.analyze_paths(network, bank, colour_set(per_class=2), settings=settings, eps=0.3,
                                     progress=False)
    assert found["settings"]["precision"] == "bfloat16" and sum(found["status"]["attacked"].values()) == 8
    assert all(p.dtype == torch.float32 for p in network.model.parameters())


def test_attacked_images_are_written_as_png_files_and_read_back(tmp_path):
    import torch

    from test_analysis import SIZE, colour_set

    from nad_ext.data import image_folder

    torch.set_num_threads(1)
    network, _ = _colour_network_and_bank()
    val = colour_set(per_class=2)
    attacked = path_study.write_attacked(network.model, val, tmp_path, SIZE, "fgsm", 0.3)
    assert attacked.labels == val.labels and attacked.classes == val.classes
    assert all(p.is_file() and p.suffix == ".png" and p.parent.parent == tmp_path / "attacked" for p in attacked.paths)
    tree = image_folder(tmp_path, "attacked")  # an ImageFolder tree: class folders in class order
    assert tree.labels == val.labels and len(tree) == len(val)
    changed = 0
    for i in range(len(val)):
        diff = (attacked.load(i).int() - val.load(i).int()).abs()
        assert diff.max() <= round(0.3 * 255) + 1  # within eps, after rounding to uint8
        changed += int(diff.max() > 0)
    assert changed > 0
    same = path_study.write_attacked(network.model, val, tmp_path / "zero", SIZE, "pgd", 0.0)
    assert all(torch.equal(same.load(i), val.load(i)) for i in range(len(val)))  # eps 0: the images themselves
    with pytest.raises(ValueError, match="attack must be one of"):
        path_study.analyze_paths(network, None, val, settings=_tiny_path_settings(), attack="cw")


def test_demo_paths_is_an_option_of_nad_demo():
    import dataclasses

    from nad_ext import cli
    from nad_ext.training import PathSettings

    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).paths is False
    assert parser.parse_args(["demo", "--paths"]).paths is True
    settings = demo.demo_path_settings(type("Bank", (), {"config": {"beta": 4.5, "lr": 0.1, "init_std": 1.0}})())
    assert dataclasses.replace(settings, beta=None) == PathSettings(device="cpu")  # nad paths' defaults
    assert settings.beta == 4.5
