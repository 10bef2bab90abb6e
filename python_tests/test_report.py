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
    # curves + 2 heatmaps + 2 networks x 2 mosaic examples
    assert len(images) == 7
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for title in ("Layer-wise curves", "Task similarity", "Mosaic examples", "Confusion versus similarity",
                  "Masked accuracy", "Run metadata", "nad_ext version", "colours4"):
        assert title in page
    assert "no hit rate at pool" in page
    assert "Objective: paper" in page
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary files left


def test_report_handles_skipped_confusion_and_json_results(results, tmp_path):
    stripped = dict(results, confusion={"skipped": "needs one task per class"},
                    hit_rate=dict(results["hit_rate"], examples=[{"classes": ["a"]}]))
    page = write_report({"n": stripped}, tmp_path / "r.html", {}).read_text()
    assert "Skipped: needs one task per class" in page and "No example arrays" in page
    with pytest.raises(ValueError, match="empty"):
        write_report({}, tmp_path / "x.html", {})
