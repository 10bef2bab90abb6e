import base64
import re

import pytest

from nad_ext import analysis
from nad_ext.report import write_report
from test_analysis import SIZE, colour_set, make_gated, own_channel_bank


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    gated, val, bank = make_gated(), colour_set(), own_channel_bank()
    return analysis.run_all(gated, bank, val, SIZE, tmp_path_factory.mktemp("run"), num_mosaics=3)


def test_report_is_one_html_page_with_embedded_figures(results, tmp_path):
    out = write_report({"colour_a": results, "colour_b": results}, tmp_path / "sub" / "report.html",
                       {"dataset": "colours4", "config": {"beta": 1.0}})
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # curves + hit rate + 2 heatmaps + 2 networks x 2 mosaic examples
    assert len(images) == 8
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for title in ("Layer-wise curves", "Task similarity", "Mosaic examples", "Confusion versus similarity",
                  "Masked accuracy", "Run metadata", "nad_ext version", "colours4"):
        assert title in page
    assert "pool: gate point output is not spatial" in page
    for name in ("own-class accuracy", "false positives on other classes", "balanced accuracy",
                 "open channels (weighted by channels)"):
        assert name in page
    assert "rejection" not in page
    assert "Objective: paper" in page and "colour_a: paper objective" in page
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary files left


def test_report_handles_skipped_confusion_and_json_results(results, tmp_path):
    stripped = dict(results, confusion={"skipped": "needs one task per class"},
                    hit_rate=dict(results["hit_rate"], examples=[{"classes": ["a"]}]))
    page = write_report({"n": stripped}, tmp_path / "r.html", {}).read_text()
    assert "Skipped: needs one task per class" in page and "No example arrays" in page
    with pytest.raises(ValueError, match="empty"):
        write_report({}, tmp_path / "x.html", {})


def test_constant_maps_are_explained_in_the_mosaic_panels(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from nad_ext import report

    bank = own_channel_bank()
    bank.logits[0][:] = -5.0  # task 0: every channel closed at relu1
    res = analysis.run_all(make_gated(), bank, colour_set(), SIZE, tmp_path, num_mosaics=2, num_examples=1)
    ex = res["hit_rate"]["examples"][0]
    q = ex["class_indices"].index(0)
    assert ex["constant"][q][:2] == ["all channels closed", "all channels closed at relu1"]
    drawn, original = [], Axes.text
    monkeypatch.setattr(Axes, "text",
                        lambda self, x, y, s, *a, **k: drawn.append(s) or original(self, x, y, s, *a, **k))
    # mosaic_figure draws the target class of quadrant (example % 4): put the mosaic at index q
    report.mosaic_figure("n", dict(res, hit_rate=dict(res["hit_rate"], examples=[ex] * 4)), q)
    assert [t.replace("\n", " ") for t in drawn] == ["all channels closed", "all channels closed at relu1"]


def test_old_results_with_the_old_measure_names_still_report(tmp_path):
    import json

    today = analysis.run_all(make_gated(), own_channel_bank(), colour_set(), SIZE, tmp_path / "old", num_mosaics=2)
    path = tmp_path / "old" / "results.json"
    saved = json.loads(path.read_text())
    for row in saved["masked_accuracy"]["tasks"] + [saved["masked_accuracy"]["mean"]]:
        for prefix in ("", "original_"):
            row[prefix + "accuracy"] = row.pop(prefix + "own_class_accuracy")
            row[prefix + "rejection"] = row.pop(prefix + "false_positive_rate")
            row.pop(prefix + "balanced_accuracy")
    path.write_text(json.dumps(saved))
    loaded = analysis.load_results(tmp_path / "old")
    assert loaded["masked_accuracy"]["mean"] == pytest.approx(today["masked_accuracy"]["mean"])
    measures = lambda row: {k: v for k, v in row.items() if k.endswith(("accuracy", "rate"))}  # noqa: E731
    loaded_task, today_task = loaded["masked_accuracy"]["tasks"][1], today["masked_accuracy"]["tasks"][1]
    assert measures(loaded_task) == pytest.approx(measures(today_task))
    assert "own-class accuracy" in write_report({"old": loaded}, tmp_path / "r.html", {}).read_text()


@pytest.fixture(scope="module")
def colour_paths():
    import torch

    from nad_ext import path_study
    from nad_ext.training import Network, PathSettings
    from test_analysis import POINTS, ColourNet

    torch.set_num_threads(1)
    settings = PathSettings(beta=0.5, steps=2, views=2, init_std=0.01, image_size=SIZE, device="cpu")
    return path_study.analyze_paths(Network(ColourNet(), POINTS, "colour"), own_channel_bank(), colour_set(),
                                    settings=settings, eps=0.3, progress=False)


def test_report_has_a_per_image_paths_section_only_with_paths_results(results, colour_paths, tmp_path):
    page = write_report({"colour_a": dict(results, paths=colour_paths), "colour_b": results}, tmp_path / "r.html",
                        {}).read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 9  # the 8 of the report without paths, and the per-gate-point figure (c)
    section = page[page.index('<h2 id="paths">'):page.index('<h2 id="metadata">')]
    assert '<a href="#paths">Per-image paths</a>' in page
    assert "<h3>colour_a</h3>" in section and "<h3>colour_b</h3>" not in section  # colour_b has no paths
    for row in ("(a) path to class, top-1 agreement with the label", "top-4 agreement with the prediction",
                "(b) misclassified images (0) closer to the predicted class",
                "(d) detector ROC AUC, attacked (all, 20)",
                "prediction flipped", "(c) Class specificity per gate point", "FGSM at eps 0.3"):
        assert row in section, row
    top1 = colour_paths["path_to_class"]["top1_label"]
    assert f"<td class=\"num\">{top1:.3f}</td><td class=\"num\">0.250</td>" in section  # value, then chance
    assert f"accuracy 100.0% clean, {100 * colour_paths['attack']['accuracy_attacked']:.1f}% attacked" in section
    without = write_report({"colour_a": results}, tmp_path / "s.html", {}).read_text()
    assert "Per-image paths" not in without and 'id="paths"' not in without
