"""nad_ext.analysis.paths on planted paths whose answers are known: the similarity against a
pure-PyTorch IoU, path-to-class, misclassified images, per-gate-point agreement, the ROC AUC
against a pair count, and the FGSM / PGD attacks on a tiny network."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nad_ext.analysis.paths import (detector_auc, fgsm, layerwise_path_to_class, misclassified_paths,
                                    path_class_similarity, path_outlier_scores, path_to_class, pgd, roc_auc)
from nad_ext.gates.maskbank import MaskBank, Task
from nad_ext.gates.model import GatedModel
from nad_ext.gates.pathstore import PathChunk, StoredPaths
from nad_ext.gates.points import GatePoint

torch.set_num_threads(1)

# Three classes; gate points "a" and "c" give each class its own channels, "b" gives every class
# the same channels (there, a path says nothing about its class).
POINTS = [GatePoint("a", 30), GatePoint("b", 16), GatePoint("c", 24)]


def class_sets() -> list[torch.Tensor]:
    """Per gate point, the (3, C_l) bool sub-architectures."""
    a = torch.zeros(3, 30, dtype=torch.bool)
    c = torch.zeros(3, 24, dtype=torch.bool)
    for t in range(3):
        a[t, 10 * t:10 * t + 10] = True
        c[t, 8 * t:8 * t + 8] = True
    b = torch.zeros(3, 16, dtype=torch.bool)
    b[:, :8] = True
    return [a, b, c]


def make_bank(sets=None) -> MaskBank:
    sets = class_sets() if sets is None else sets
    return MaskBank("planted", POINTS, [Task(f"class{t}", (t,)) for t in range(3)],
                    [s.float() * 4 - 2 for s in sets])


def make_paths(n=300, wrong=0, flip=0.05, seed=1, status=None) -> PathChunk:
    """n images of labels n % 3; the first ``wrong`` are predicted as label + 1 and their paths
    copy the predicted class's sets, the others copy their label's; each channel flipped with
    probability ``flip``."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n) % 3
    pred = lab.clone()
    pred[:wrong] = (lab[:wrong] + 1) % 3
    logits = []
    for s in class_sets():
        m = s[pred] ^ (torch.rand(n, s.shape[1], generator=g) < flip)
        logits.append(m.float() * 2 - 1)
    st = torch.zeros(n, dtype=torch.int8) if status is None else status
    return PathChunk(torch.arange(n) + 1000, lab, lab.clone(), pred, st, logits)


def iou_reference(paths: list[torch.Tensor], tasks: list[torch.Tensor]) -> torch.Tensor:
    """Mean over gate points of |A & B| / |A | B|, 0/0 = 1, pair by pair."""
    layers = []
    for p, t in zip(paths, tasks):
        inter = (p[:, None, :] & t[None, :, :]).sum(-1).double()
        union = (p[:, None, :] | t[None, :, :]).sum(-1).double()
        layers.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)))
    return torch.stack(layers).mean(0)


def test_similarity_matches_a_pure_pytorch_iou_with_empty_layers():
    paths = [torch.rand(23, p.channels) < 0.3 for p in POINTS]
    tasks = [torch.rand(3, p.channels) < 0.4 for p in POINTS]
    paths[1][:5] = False  # empty paths at "b": 0/0 = 1 against an empty task, 0 against the others
    tasks[1][0] = False
    bank = make_bank(tasks)
    sim = path_class_similarity(paths, bank, block=7)
    torch.testing.assert_close(sim.double(), iou_reference(paths, tasks), rtol=0, atol=1e-6)
    by_name = path_class_similarity({p.name: m for p, m in zip(reversed(POINTS), reversed(paths))}, bank)
    assert torch.equal(by_name, sim)
    assert torch.equal(path_outlier_scores(paths, bank), 1 - sim.amax(1))


def test_paths_find_their_class_and_shuffled_labels_do_not():
    out = path_to_class(make_paths(), make_bank(), k=2, permutations=20)
    assert out["images"] == 300 and out["excluded"] == {"status": 0, "no_task": 0}
    assert out["top1_label"] == 1.0 and out["topk_label"] == 1.0 and out["top1_prediction"] == 1.0
    assert out["chance"] == {"top1": pytest.approx(1 / 3), "topk": pytest.approx(2 / 3)}
    assert abs(out["permuted"]["top1_label"] - 1 / 3) < 0.06
    assert abs(out["permuted"]["topk_label"] - 2 / 3) < 0.06
    assert out["image_index"][:3] == [1000, 1001, 1002]
    assert [row[0] for row in out["topk_classes"]] == [i % 3 for i in range(300)]
    assert out == path_to_class(make_paths(), make_bank(), k=2, permutations=20)  # seeded
    assert json.loads(json.dumps(out)) == out


def test_bad_statuses_and_labels_without_a_task_are_left_out():
    status = torch.zeros(30, dtype=torch.int8)
    status[:4] = 1
    paths = make_paths(30, wrong=9, status=status)
    paths.label[4] = 7  # a class the bank has no task for
    for m in paths.logits:  # the left-out images' paths say nothing
        m[:5] = torch.where(torch.rand(5, m.shape[1]) < 0.5, 1.0, -1.0)
    out = path_to_class(paths, make_bank(), k=1, per_image=False)
    assert out["images"] == 25 and out["excluded"] == {"status": 4, "no_task": 1}
    assert out["top1_prediction"] == 1.0 and out["top1_label"] == pytest.approx(21 / 25)
    wrong = misclassified_paths(paths, make_bank())
    assert wrong["misclassified"] == 4 and wrong["share_closer_to_prediction"] == 1.0 and wrong["images"] == 25
    layers = layerwise_path_to_class(paths, make_bank(), block=4)
    assert [row["top1_label"] for row in layers["per_gate_point"]] == pytest.approx([21 / 25, 1 / 3, 21 / 25])
    assert "topk_classes" not in out
    sim = path_class_similarity(paths.masks(), make_bank())
    assert path_to_class(paths, make_bank(), k=1, similarity=sim, per_image=False) == out
    with pytest.raises(ValueError, match="no image left"):
        path_to_class(make_paths(6, status=torch.ones(6, dtype=torch.int8)), make_bank())


def test_misclassified_paths_follow_the_prediction():
    out = misclassified_paths(make_paths(wrong=30), make_bank())
    assert out["misclassified"] == 30 and out["correct"] == 270
    assert out["share_closer_to_prediction"] == 1.0
    assert out["correct_share_closer_to_other"] == 0.0 and out["chance"] == 0.5
    a = path_to_class(make_paths(wrong=30), make_bank(), permutations=0, per_image=False, k=1)
    assert a["top1_prediction"] == 1.0 and a["top1_label"] == pytest.approx(0.9)


def test_a_gate_point_shared_by_every_class_is_at_chance():
    out = layerwise_path_to_class(make_paths(), make_bank(), block=64)
    got = {row["gate_point"]: row["top1_label"] for row in out["per_gate_point"]}
    assert got["a"] == 1.0 and got["c"] == 1.0
    assert got["b"] == pytest.approx(1 / 3) and out["chance"] == pytest.approx(1 / 3)
    assert [row["relative_depth"] for row in out["per_gate_point"]] == [0.0, 0.5, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_similarity_on_cuda_matches_the_cpu():
    paths = [torch.rand(50, p.channels) < 0.3 for p in POINTS]
    sim = path_class_similarity([m.cuda() for m in paths], make_bank(), block=16)
    assert sim.is_cuda
    torch.testing.assert_close(sim.cpu(), path_class_similarity(paths, make_bank()), rtol=0, atol=1e-6)


def test_stored_paths_read_like_a_chunk():
    chunk = make_paths(wrong=12)
    stored = StoredPaths(chunk.image_index, chunk.label, chunk.target, chunk.prediction, chunk.status,
                         {p.name: m for p, m in zip(POINTS, chunk.masks())})
    assert path_to_class(stored, make_bank()) == path_to_class(chunk, make_bank())
    assert misclassified_paths(stored, make_bank()) == misclassified_paths(chunk, make_bank())


def test_inputs_are_checked():
    bank, paths = make_bank(), make_paths(12)
    with pytest.raises(ValueError, match="gate points"):
        path_class_similarity(paths.masks()[:2], bank)
    with pytest.raises(ValueError, match="gate points"):
        path_class_similarity({"a": paths.masks()[0], "x": paths.masks()[1], "c": paths.masks()[2]}, bank)
    with pytest.raises(ValueError, match="gate point 'b' must be"):
        path_class_similarity([paths.masks()[0], paths.masks()[1][:, :5], paths.masks()[2]], bank)
    with pytest.raises(ValueError, match="4 images on cpu at gate point 'b', 12 on cpu"):
        path_class_similarity([paths.masks()[0], paths.masks()[1][:4], paths.masks()[2]], bank)
    with pytest.raises(ValueError, match="keeps no logits"):
        path_to_class(PathChunk(paths.image_index, paths.label, paths.target, paths.prediction, paths.status, []),
                      bank)
    with pytest.raises(ValueError, match="k must be"):
        path_to_class(paths, bank, k=4)
    with pytest.raises(ValueError, match="similarity must be"):
        path_to_class(paths, bank, similarity=torch.zeros(5, 3))
    multi = MaskBank("m", POINTS, [Task("ab", (0, 1)), Task("c", (2,))], [torch.zeros(2, p.channels) for p in POINTS])
    with pytest.raises(ValueError, match="one task per class"):
        layerwise_path_to_class(paths, multi)
    with pytest.raises(TypeError, match="paths must be"):
        misclassified_paths(paths.masks(), bank)


def brute_force_auc(pos, neg) -> float:
    p, n = pos.double()[:, None], neg.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def test_roc_auc_is_the_pair_count():
    g = torch.Generator().manual_seed(3)
    for size in [(1, 1), (7, 13), (50, 40)]:
        pos = torch.randint(0, 6, (size[0],), generator=g).float()  # many ties
        neg = torch.randint(0, 5, (size[1],), generator=g).float()
        assert roc_auc(pos, neg) == pytest.approx(brute_force_auc(pos, neg), abs=1e-12)
    pos, neg = torch.rand(20, generator=g), torch.rand(30, generator=g)
    assert roc_auc(pos, neg) == pytest.approx(brute_force_auc(pos, neg), abs=1e-12)
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0, 1.5])) == 1.0
    assert roc_auc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="scores_negative"):
        roc_auc([1.0], [])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([float("nan")], [1.0])


def test_the_detector_tells_planted_paths_from_random_ones():
    bank = make_bank()
    clean = path_outlier_scores(make_paths(60).masks(), bank)
    noise = path_outlier_scores([torch.rand(40, p.channels) < 0.5 for p in POINTS], bank)
    out = detector_auc(clean, noise)
    assert out["auc"] == 1.0 and out["chance"] == 0.5 and out["attacked"] == 40
    assert out["attacked_mean_score"] > out["clean_mean_score"]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).train()


def test_fgsm_raises_the_loss_within_eps_and_pgd_goes_further():
    model = tiny_model()
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    loss = lambda v: float(F.cross_entropy(model(v), y).detach())  # noqa: E731
    eps = 0.1
    adv = fgsm(model, x, y, eps)
    assert (adv - x).abs().max() <= eps + 1e-6 and not adv.requires_grad
    assert loss(adv) > loss(x)
    strong = pgd(model, x, y, eps, eps / 4, 20)
    assert (strong - x).abs().max() <= eps + 1e-6
    assert loss(strong) >= loss(adv) - 1e-6
    start = pgd(model, x, y, eps, eps / 4, 5, random_start=True, generator=torch.Generator().manual_seed(0))
    assert (start - x).abs().max() <= eps + 1e-6
    assert all(p.grad is None for p in model.parameters()) and model.training  # the network is left alone


def test_attacks_go_through_a_gated_models_original_network():
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    gated = GatedModel(tiny_model().eval(), ["1:1"], 3, x[:1])
    original = lambda v: gated.original(v, record=False)[0]  # noqa: E731
    adv = fgsm(original, x, y, 0.05)
    assert (adv - x).abs().max() <= 0.05 + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(original(adv), y) > F.cross_entropy(original(x), y)


def test_attacks_in_pixel_space():
    model = tiny_model()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    m, s = torch.tensor(mean)[None, :, None, None], torch.tensor(std)[None, :, None, None]
    pixels = torch.rand(8, 3, 6, 6)
    x, y = (pixels - m) / s, torch.randint(0, 5, (8,))
    eps = 4 / 255
    for adv in (fgsm(model, x, y, eps, mean=mean, std=std), pgd(model, x, y, eps, eps / 3, 6, mean=mean, std=std)):
        back = adv * s + m
        assert (back - pixels).abs().max() <= eps + 1e-5
        assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="mean and std"):
        fgsm(model, x, y, eps, mean=mean)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -1.0)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, eps, eps, 0)
