"""The demo end to end at a small scale, and the validity check that its sub-architectures
keep their task."""
import json

import pytest

from nad_ext import analysis, data, models
from nad_ext.demo import run_demo
from nad_ext.trainer import NADConfig, build_gated_model, disentangle


@pytest.mark.slow
def test_subarchitectures_keep_their_task(tmp_path):
    train = data.generated_shapes("train", images_per_class=80)
    val = data.generated_shapes("val", images_per_class=30)
    model, accuracy = models.train_zoo_model("zoo_plain", train, val, epochs=6, progress=False)
    assert accuracy > 0.6  # the network has learnt the classes
    bank = disentangle(model, train, "zoo_plain", model_id="zoo_plain", progress=False,
                       config=NADConfig(beta=1.0, epochs=8, image_size=64, tasks_per_step=10))
    gated = build_gated_model(model, [p.name for p in bank.gate_points], len(bank.tasks), 64, model_id="zoo_plain")
    result = analysis.masked_accuracy(gated, bank, val, 64)
    mean = result["mean"]
    # Sparse (not every channel kept) and still solving its task close to the original network.
    assert bank.open_ratio().mean() < 0.9
    assert mean["accuracy"] >= mean["original_accuracy"] - 0.15, mean


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
    assert len(s["masked_accuracy_per_task"]) == 10
    # The zoo is cached: a second run loads it instead of training again.
    assert (tmp_path / "cache" / "zoo_dense.safetensors").is_file()


@pytest.mark.slow
def test_demo_disentangles_the_transformer_with_a_calibrated_beta(tmp_path):
    summary = run_demo(tmp_path / "out", cache_dir=tmp_path / "cache", epochs=1, num_mosaics=4,
                       networks=["zoo_vit"], images_per_class=(16, 8), zoo_epochs=1, progress=False)
    s = summary["zoo_vit"]
    assert s["connection"] == "transformer" and len(s["gate_points"]) == 3
    cal = s["beta_calibration"]
    assert s["beta"] == cal["beta"] and 2 <= cal["runs"] <= 4 and len(cal["tasks"]) == 2
    assert len(s["mean_hit_rate_per_gate_point"]) == 3  # tokens map to the patch grid
    assert all(h is not None for h in s["mean_hit_rate_per_gate_point"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "zoo_vit" in html
