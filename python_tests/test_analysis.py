import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from nad_ext import analysis
from nad_ext.data import ImageSet
from nad_ext.gates import GatedModel, GatePoint
from nad_ext.gates import MaskBank, Task

# Class c < 3: pure colour channel c; class 3: black.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)]
SIZE = 16  # eval size; mosaics are 32 x 32
POINTS = ["relu1", "relu2", "pool"]


def colour_set(per_class=5, raw=20, classes=4):
    images = torch.zeros(classes * per_class, 3, raw, raw, dtype=torch.uint8)
    labels = []
    for c in range(classes):
        images[c * per_class:(c + 1) * per_class] = torch.tensor(COLOURS[c], dtype=torch.uint8).view(3, 1, 1)
        labels += [c] * per_class
    return ImageSet([f"col{c}" for c in range(classes)], labels, f"colours{classes}", images=images)


class ColourNet(nn.Module):
    """relu1 channel c fires exactly on class c's pixels; relu2 copies them (channels 0-3) and adds
    channel 4 = their sum and channel 5 = a constant; pool is global (not spatial); the classifier
    reads class c from channel c, or, with ``confuse``, sends channel 0 to class 1."""

    def __init__(self, confuse=False):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)
        with torch.no_grad():
            w1 = -torch.ones(4, 3)
            w1[:3] = -1 + 2 * torch.eye(3)
            self.conv1.weight.copy_(w1.view(4, 3, 1, 1))
            self.conv1.bias.fill_(-3.0)
            self.conv2.weight.zero_()
            self.conv2.bias.zero_()
            for c in range(4):
                self.conv2.weight[c, c, 1, 1] = 1.0
                self.conv2.weight[4, c, 1, 1] = 1.0
            self.conv2.bias[5] = 1.0
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for c in range(4):
                self.fc.weight[c, c] = 1.0
            if confuse:
                self.fc.weight[1, 0] = 2.0

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def make_gated(num_tasks=4, confuse=False):
    return GatedModel(ColourNet(confuse), POINTS, num_tasks, torch.zeros(1, 3, SIZE, SIZE), model_id="colour")


def make_bank(logits, tasks=None, sizes=(4, 6, 6), model_id="colour"):
    T = logits[0].shape[0]
    tasks = tasks or [Task(f"col{t}", (t,)) for t in range(T)]
    points = [GatePoint(n, c) for n, c in zip(POINTS, sizes)]
    return MaskBank(model_id, points, tasks, [torch.as_tensor(m, dtype=torch.float32) for m in logits])


def own_channel_bank():
    """Task c opens channel c everywhere; tasks 0, 1 also share channel 4, tasks 2, 3 channel 5."""
    logits = [torch.full((4, c), -5.0) for c in (4, 6, 6)]
    for t in range(4):
        for m in logits:
            m[t, t] = 5.0
        for m in logits[1:]:
            m[t, 4 if t < 2 else 5] = 5.0
    return make_bank(logits)


# ------------------------------------------------------------------------------------------
# Mask-only analyses


def test_stats_match_hand_computation():
    bank = make_bank([torch.tensor([[1., -1, -1, -1], [1, 1, -1, -1]]),
                      torch.tensor([[1., 1, 1, -1, -1, -1], [-1.] * 6]),
                      torch.tensor([[1.] * 6, [1., -1, -1, -1, -1, -1]])])
    stats = analysis.subarchitecture_stats(bank)
    np.testing.assert_allclose(stats["per_gate_point"]["mean"], [0.375, 0.25, 7 / 12])
    np.testing.assert_allclose(stats["per_gate_point"]["std"], [0.125, 0.25, 5 / 12])
    np.testing.assert_allclose(stats["per_task"][1]["per_gate_point"], [0.5, 0.0, 1 / 6])
    np.testing.assert_allclose([t["overall"] for t in stats["per_task"]], [10 / 16, 3 / 16])
    assert stats["overall"] == pytest.approx(13 / 32)
    assert stats["relative_depth"] == [0.0, 0.5, 1.0]


def numpy_similarity(masks, sizes, metric):
    T = masks.shape[0]
    out = np.zeros((T, T))
    bounds = np.cumsum([0] + list(sizes))
    for i in range(T):
        for j in range(T):
            vals = []
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                a, b = masks[i, lo:hi], masks[j, lo:hi]
                inter = (a & b).sum()
                den = (a | b).sum() if metric == "iou" else min(a.sum(), b.sum())
                vals.append(1.0 if den == 0 else inter / den)
            out[i, j] = np.mean(vals)
    return out


@pytest.mark.parametrize("metric", ["iou", "iomin"])
def test_similarity_matches_double_loop(metric):
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(7, c, generator=gen) for c in (4, 6, 6)]
    logits[0][2] = -1.0  # empty layers: 0/0 = 1 against each other
    logits[0][5] = -1.0
    bank = make_bank(logits)
    expected = numpy_similarity(bank.binary().numpy(), bank.layer_sizes, metric)
    np.testing.assert_allclose(analysis.similarity(bank, metric), expected, atol=1e-6)
    layerwise = analysis.layerwise_similarity(bank, metric)
    per_layer = [numpy_similarity(m.numpy() > 0, [m.shape[1]], metric) for m in bank.logits]
    i, j = np.triu_indices(7, 1)
    np.testing.assert_allclose(layerwise, [p[i, j].mean() for p in per_layer], atol=1e-6)


def test_cluster_order_groups_similar_tasks():
    groups = [[0, 3, 5], [1, 4], [2, 6, 7]]
    sim = np.full((8, 8), 0.1)
    for g in groups:
        sim[np.ix_(g, g)] = 0.9
    sim[np.ix_([0, 3, 5], [1, 4])] = sim[np.ix_([1, 4], [0, 3, 5])] = 0.4
    np.fill_diagonal(sim, 1.0)
    order = analysis.cluster_order(sim)
    assert sorted(order) == list(range(8))
    for g in groups:
        positions = sorted(order.index(t) for t in g)
        assert positions == list(range(positions[0], positions[0] + len(g)))
    assert analysis.cluster_order(np.ones((1, 1))) == [0]
    with pytest.raises(ValueError, match="square"):
        analysis.cluster_order(np.ones((2, 3)))


# ------------------------------------------------------------------------------------------
# Analyses that run the network


def test_masked_accuracy_all_open_equals_original_and_all_closed_is_chance():
    gated, val = make_gated(), colour_set()
    open_bank = make_bank([torch.full((4, c), 5.0) for c in (4, 6, 6)])
    res = analysis.masked_accuracy(gated, open_bank, val, SIZE, batch_size=7)
    for row in res["tasks"]:
        assert row["own_class_accuracy"] == row["original_own_class_accuracy"] == 1.0
        assert row["false_positive_rate"] == row["original_false_positive_rate"] == 0.0
        assert row["balanced_accuracy"] == row["original_balanced_accuracy"] == 1.0
        assert row["images"] == 5 and row["other_images"] == 15
    closed = make_bank([torch.full((4, c), -5.0) for c in (4, 6, 6)])
    res = analysis.masked_accuracy(gated, closed, val, SIZE, other_images_per_class=2)
    assert [r["other_images"] for r in res["tasks"]] == [6] * 4
    # constant logits: every image is predicted as class 0, so task 0's sub-architecture calls
    # every image its own: own-class accuracy 1 but all false positives, balanced accuracy 0.5
    assert [r["own_class_accuracy"] for r in res["tasks"]] == [1.0, 0.0, 0.0, 0.0]
    assert [r["false_positive_rate"] for r in res["tasks"]] == [1.0, 0.0, 0.0, 0.0]
    assert [r["balanced_accuracy"] for r in res["tasks"]] == [0.5] * 4
    assert res["mean"]["own_class_accuracy"] == pytest.approx(0.25)
    assert res["mean"]["false_positive_rate"] == pytest.approx(0.25)
    assert res["mean"]["original_own_class_accuracy"] == 1.0
    assert analysis.OWN_CLASS_ACCURACY in res["definition"] and analysis.FALSE_POSITIVES in res["definition"]


def test_masked_accuracy_of_the_soft_gates():
    """binary=False measures the gates as trained, sigmoid(m / temperature): logits 0 close every
    binary gate (every image answered as class 0) but leave soft gates of 0.5 that keep this
    network's answers; at a low temperature the soft gates are the binary ones."""
    gated, val = make_gated(), colour_set()
    zero = make_bank([torch.zeros(4, c) for c in (4, 6, 6)])
    assert analysis.masked_accuracy(gated, zero, val, SIZE)["mean"]["balanced_accuracy"] == 0.5
    assert analysis.masked_accuracy(gated, zero, val, SIZE, binary=False)["mean"]["balanced_accuracy"] == 1.0
    mixed = make_bank([torch.randn(4, c, generator=torch.Generator().manual_seed(c)) for c in (4, 6, 6)])
    gated.set_temperature(1e-4)
    assert (analysis.masked_accuracy(gated, mixed, val, SIZE, binary=False)["tasks"]
            == analysis.masked_accuracy(gated, mixed, val, SIZE)["tasks"])


def test_hit_rate_is_one_where_the_map_lights_the_quadrant():
    gated, val, bank = make_gated(), colour_set(), own_channel_bank()
    res = analysis.hit_rate(gated, bank, val, SIZE, num_mosaics=6, seed=3, null_samples=2, batch_size=8)
    assert res["mean"][0] == 1.0 and res["std"][0] == 0.0
    assert res["mean"][1] == 1.0
    assert res["spatial"] == [True, True, False]
    assert res["mean"][2] is None and res["null_mean"][2] is None and "pool" in res["notes"]
    assert 0.0 <= res["null_mean"][0] <= 1.0 and res["null_std"][0] is not None
    assert res["chance"] == 0.25 and res["pairs"] == 24
    ex = res["examples"][0]
    assert ex["mosaic"].shape == (64, 64, 3) and ex["mosaic"].dtype == np.uint8
    assert ex["maps"][0][0].shape == (64, 64) and ex["maps"][0][2] is None
    assert sorted(ex["class_indices"]) == [0, 1, 2, 3]
    # the gates were restored after the null runs
    torch.testing.assert_close(gated.logits[0].detach(), bank.logits[0])


def test_constant_maps_are_left_out_of_the_hit_rate_and_explained():
    gated, val = make_gated(), colour_set()
    bank = own_channel_bank()
    bank.logits[0][0] = -5.0  # task 0 (class col0): every channel closed at relu1
    res = analysis.hit_rate(gated, bank, val, SIZE, num_mosaics=6, seed=3, null_samples=0, batch_size=8)
    # every mosaic holds all four classes: 6 of the 24 (mosaic, class) pairs are class 0's
    assert res["constant_pairs"] == [6, 6, None]
    # the other pairs light their quadrant; counting class 0's flat maps would give 0.8125
    assert res["mean"][0] == 1.0 and res["mean"][1] == 1.0
    ex = res["examples"][0]
    q = ex["class_indices"].index(0)
    # relu2 of task 0 only sees zeros: its open channels carry a constant
    assert ex["constant"][q] == ["all channels closed", "all channels closed at relu1", None]
    assert all(ex["constant"][o] == [None, None, None] for o in range(4) if o != q)
    everything_closed = make_bank([torch.full((4, c), -5.0) for c in (4, 6, 6)])
    res = analysis.hit_rate(gated, everything_closed, val, SIZE, num_mosaics=2, null_samples=1)
    assert res["mean"][0] is None and res["null_mean"][0] is None and res["constant_pairs"][0] == 8
    assert res["notes"]["relu1"] == analysis.ALL_CONSTANT_NOTE


def test_hit_rate_null_of_a_permuted_single_channel_is_near_chance():
    # one open channel of four at relu1: a random one lights its own class's quadrant
    gated, val, bank = make_gated(), colour_set(), own_channel_bank()
    res = analysis.hit_rate(gated, bank, val, SIZE, num_mosaics=2, null_samples=8, seed=0)
    assert res["null_mean"][0] < 0.8


def test_hit_rate_is_deterministic_given_the_seed():
    gated, val, bank = make_gated(), colour_set(), own_channel_bank()
    run = lambda seed: analysis.hit_rate(gated, bank, val, SIZE, num_mosaics=5, seed=seed, num_examples=3)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a["mean"] == b["mean"] and a["null_mean"] == b["null_mean"]
    for ea, eb in zip(a["examples"], b["examples"]):
        assert ea["class_indices"] == eb["class_indices"]
        np.testing.assert_array_equal(ea["maps"][1][0], eb["maps"][1][0])
    assert [e["class_indices"] for e in a["examples"]] != [e["class_indices"] for e in c["examples"]]


def test_top_hits_splits_ties_evenly():
    flat = torch.zeros(2, 8, 8)
    flat[1, :4, :4] = 1.0
    hits = analysis.top_hits(flat, torch.tensor([1, 0]), 0.1)
    assert hits.tolist() == [0.25, 1.0]


def test_confusion_vs_similarity_on_a_hand_made_case():
    gated, val, bank = make_gated(confuse=True), colour_set(), own_channel_bank()
    res = analysis.confusion_vs_similarity(gated, bank, val, SIZE, k=1)
    first = res["per_class"][0]
    assert first["similar"] == ["col1"] and first["predicted"] == ["col1"] and first["overlap"] == 1
    assert res["misclassified"] == 5 and res["ranks"] == [1.0] * 5
    assert res["fraction_rank_le_k"] == 1.0 and res["chance"] == pytest.approx(1 / 3)
    assert res["per_class"][2]["similar"] == ["col3"]


def test_each_analysis_progress_bar_counts_every_batch_once(tmp_path, monkeypatch):
    """The bars of run_all's analyses end at their totals (a batch counted twice showed 16/8)."""
    from nad_ext._utils import progress as nad_progress

    bars = []

    class Recorder:
        def __init__(self, total, desc, **_):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(nad_progress, "bar", Recorder)
    gated, val, bank = make_gated(), colour_set(), own_channel_bank()
    analysis.run_all(gated, bank, val, SIZE, tmp_path, num_mosaics=6, batch_size=8, progress=True)
    assert len(bars) == 3
    assert [(b.desc.split(": ")[1].split(" (")[0], b.n) for b in bars] == [
        (f"{analysis.OWN_CLASS_ACCURACY} and {analysis.FALSE_POSITIVES}", 3), ("hit rate", 6),
        ("confusion versus similarity", 3)]
    assert all(b.n == b.total for b in bars)


def test_single_image_view_highlights_the_class_region():
    gated, bank = make_gated(), own_channel_bank()
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[0, :, :8] = 255  # left half red (class 0), right half black (class 3)
    views = analysis.single_image_view(gated, bank, image, "col0", SIZE, top_fraction=0.05)
    assert [v["gate_point"] for v in views] == POINTS
    assert views[2]["map"] is None and views[0]["map"].shape == (SIZE, SIZE)
    top = views[0]["top"]
    assert top.any() and not top[:, SIZE // 2 + 1:].any()


def test_run_all_writes_results(tmp_path):
    gated, val, bank = make_gated(), colour_set(), own_channel_bank()
    res = analysis.run_all(gated, bank, val, SIZE, tmp_path, num_mosaics=3)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["hit_rate"]["mean"][2] is None and "mosaic" not in saved["hit_rate"]["examples"][0]
    assert len(saved["similarity"]["iou"]) == 4 and sorted(saved["similarity"]["order"]) == [0, 1, 2, 3]
    assert saved["confusion"]["k"] == 3
    csv = (tmp_path / "similarity_iou.csv").read_text().splitlines()
    assert len(csv) == 5 and csv[1].startswith('"col0",1.000000')
    assert "example0_mosaic" in np.load(tmp_path / "hit_rate_examples.npz")
    assert math.isclose(res["similarity"]["iou"][0, 1], saved["similarity"]["iou"][0][1], rel_tol=1e-6)


# ------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_get_clear_errors(tmp_path):
    gated, val, bank = make_gated(), colour_set(), own_channel_bank()
    wrong = make_bank([torch.zeros(4, c) for c in (4, 5, 6)], sizes=(4, 5, 6))
    with pytest.raises(ValueError, match="does not match the model"):
        analysis.masked_accuracy(gated, wrong, val, SIZE)
    far = make_bank([torch.zeros(4, c) for c in (4, 6, 6)],
                    tasks=[Task(f"t{t}", (t + 2,)) for t in range(4)])
    with pytest.raises(ValueError, match="names classes"):
        analysis.run_all(gated, far, val, SIZE, tmp_path)
    with pytest.raises(ValueError, match="num_mosaics"):
        analysis.hit_rate(gated, bank, val, SIZE, num_mosaics=0)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="top_fraction"):
            analysis.run_all(gated, bank, val, SIZE, tmp_path, top_fraction=bad)
    three = make_gated(num_tasks=3)
    small = make_bank([torch.zeros(3, c) for c in (4, 6, 6)])
    with pytest.raises(ValueError, match="at least 4 classes"):
        analysis.hit_rate(three, small, colour_set(classes=3), SIZE)
    pairs = make_bank([torch.zeros(2, c) for c in (4, 6, 6)],
                      tasks=[Task("a", (0, 1)), Task("b", (2, 3))])
    with pytest.raises(ValueError, match="one task per class"):
        analysis.confusion_vs_similarity(make_gated(num_tasks=2), pairs, val, SIZE)
    with pytest.raises(ValueError, match="k must be"):
        analysis.confusion_vs_similarity(gated, bank, val, SIZE, k=4)
    assert not list(tmp_path.iterdir())  # nothing written on bad input


# ------------------------------------------------------------------------------------------
# Other layouts: tokens (ViT-like, one input size), NHWC maps, attention heads


def test_position_maps_of_tokens_nhwc_maps_and_heads():
    tokens = torch.rand(2, 17, 5)
    grid = analysis.position_map(tokens, GatePoint("t", 5, 2))
    torch.testing.assert_close(grid, tokens[:, 1:].sum(2).reshape(2, 4, 4))  # class token dropped
    torch.testing.assert_close(analysis.position_map(tokens[:, 1:], GatePoint("t", 5, 2)),
                               tokens[:, 1:].sum(2).reshape(2, 4, 4))
    assert analysis.position_map(torch.rand(2, 19, 5), GatePoint("t", 5, 2)) is None  # not a square grid
    nhwc = torch.rand(2, 3, 4, 6)
    torch.testing.assert_close(analysis.position_map(nhwc, GatePoint("m", 6, 3)), nhwc.sum(3))
    heads = torch.rand(2, 17, 3, 8)  # (N, L, heads, head_dim)
    torch.testing.assert_close(analysis.position_map(heads, GatePoint("a", 3, 2, "heads")),
                               heads[:, 1:].sum((2, 3)).reshape(2, 4, 4))
    swin_heads = torch.rand(2, 4, 5, 3, 8)
    torch.testing.assert_close(analysis.position_map(swin_heads, GatePoint("a", 3, 3, "heads")),
                               swin_heads.sum((3, 4)))
    assert analysis.activation_maps(torch.rand(2, 1, 6), 8, GatePoint("v", 6, 2)) is None  # one token


class ColourTokens(nn.Module):
    """ColourNet's first layer as tokens: one token per pixel of a 16 x 16 image (and a class
    token in front), channel c firing on class c's pixels. Like a ViT, one input size only."""

    def __init__(self):
        super().__init__()
        self.embed = ColourNet().conv1
        self.feat = nn.ReLU()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(4))
            self.fc.bias.zero_()

    def forward(self, x):
        torch._assert(x.shape[-1] == SIZE, "one input size")
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.new_zeros(tokens.shape[0], 1, 4), tokens], 1)
        return self.fc(self.feat(tokens).mean(1))


def test_hit_rate_on_tokens_of_a_fixed_size_network():
    gated = GatedModel(ColourTokens(), ["feat"], 4, torch.zeros(1, 3, SIZE, SIZE), model_id="tokens")
    assert gated.gate_points == [GatePoint("feat", 4, 2)]
    logits = torch.full((4, 4), -5.0)
    logits.fill_diagonal_(5.0)
    bank = MaskBank("tokens", gated.gate_points, [Task(f"col{t}", (t,)) for t in range(4)], [logits])
    res = analysis.hit_rate(gated, bank, colour_set(), SIZE, num_mosaics=4, seed=1, null_samples=0)
    assert res["mosaic_size"] == SIZE  # the mosaic is shrunk to the network's one input size
    assert res["spatial"] == [True] and res["mean"] == [1.0]
