"""The fidelity check after a run (nad_ext/training/fidelity.py) and beta calibration by it
(issue 27, items 1 and 2): collapse is detected and named, the figures reach the bank and
log.json, and calibration by fidelity chooses a beta that keeps the tasks where an open-ratio
target collapses them."""
import json
import warnings

import pytest
import torch

from nad_ext.gates import GatedModel, MaskBank
from nad_ext.training import (CalibrationSettings, FidelitySettings, FidelityWarning, NADConfig, Network, disentangle,
                              search_beta_by_fidelity)
from nad_ext.training.config import default_tasks
from nad_ext.training.fidelity import flagged_tasks, measure_fidelity
from test_trainer import CFG, KnownChannels, colour_images

IMAGES = colour_images(per_class=40)


def run(beta, lr=0.1, target_open_ratio=0.3, **kwargs):
    config = NADConfig(**{**CFG, "beta": beta, "lr": lr, "target_open_ratio": target_open_ratio})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = disentangle(Network(KnownChannels(), ["feat"], "known"), IMAGES, progress=False, config=config,
                           **kwargs)
    return bank, [w for w in caught if issubclass(w.category, FidelityWarning)]


def test_the_figures_against_a_hand_count():
    """KnownChannels: class c's logit reads channels 2c, 2c+1. With only task c1's channels open
    for every task, every sub-architecture answers class 1 for class-1 images and class 0 (all
    logits 0: the first) otherwise."""
    gated = GatedModel(KnownChannels(), ["feat"], 3, torch.zeros(1, 3, 16, 16))
    with torch.no_grad():
        gated.logits[0].fill_(-10.0)
        gated.logits[0][:, 2:4] = 10.0
    tasks = default_tasks(IMAGES)
    settings = FidelitySettings(images_per_task=10, other_images=20)
    fig = measure_fidelity(gated, tasks, [0, 1, 2], IMAGES, 16, settings)
    assert fig["images"] == [10, 10, 10] and fig["other_images"] == [20, 20, 20]
    # task c0: own images answered 0 (right), others: class-1 images answered 1, class-2 answered 0
    assert fig["own_class_accuracy"] == [1.0, 1.0, 0.0]
    assert fig["original_own_class_accuracy"] == [1.0, 1.0, 1.0]
    assert fig["original_false_positive_rate"] == [0.0, 0.0, 0.0]
    # c1 never answers 1 on others; c0 answers 0 on the class-2 images among its others
    assert fig["false_positive_rate"][1] == 0.0 and 0 < fig["false_positive_rate"][0] < 1
    assert fig["false_positive_rate"][2] == 0.0  # class 2 is never answered
    assert fig["balanced_accuracy"][2] == 0.5 and fig["constant"] == [False, False, False]
    assert flagged_tasks(fig, ["c0", "c1", "c2"], settings) == [("c2", "own-class accuracy 0% against the original's 100%")]
    # Only tasks asked for are measured.
    part = measure_fidelity(gated, tasks, [1], IMAGES, 16, settings)
    assert part["own_class_accuracy"] == [None, 1.0, None]


def test_a_collapsing_run_is_named_and_recorded(tmp_path):
    """beta so large that every gate closes: each sub-architecture answers class 0 for every
    image. The run warns naming the tasks and suggesting a smaller beta; the bank and the last
    epoch's log entry hold the figures."""
    bank, caught = run(beta=1000.0, lr=1.0, out_dir=tmp_path)
    assert (torch.cat(bank.logits) <= 0).all()  # every gate closed
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("3 of 3 sub-architectures do not do their task: 'c0' (constant: 100% of its answers")
    assert "'c1' (constant" in message and "try a smaller beta than 1000" in message and "--beta auto" in message
    assert bank.fidelity["constant"] == [True, True, True] and bank.fidelity["top_answer_share"] == [1.0] * 3
    assert [f[0] for f in bank.fidelity["flagged"]] == ["c0", "c1", "c2"]
    assert bank.fidelity["images_from"] == "training images"
    assert MaskBank.load(tmp_path / "masks.safetensors").fidelity == bank.fidelity
    log = json.loads((tmp_path / "log.json").read_text())["epochs"]
    assert "fidelity_constant" not in log[0] and log[-1]["fidelity_constant"] == [True, True, True]
    assert log[-1]["fidelity_own_class_accuracy"] == bank.fidelity["own_class_accuracy"]


def test_a_good_run_passes_quietly_and_the_check_can_be_turned_off():
    bank, caught = run(beta=1.0)
    assert caught == [] and bank.fidelity["flagged"] == []
    assert bank.fidelity["own_class_accuracy"] == [1.0, 1.0, 1.0] and not any(bank.fidelity["constant"])
    off, caught = run(beta=1000.0, lr=1.0, fidelity=False)
    assert off.fidelity is None and caught == []


def test_the_check_reads_the_validation_images_when_given():
    val = colour_images(per_class=6)
    bank, _ = run(beta=1.0, check_images=val, fidelity=FidelitySettings(images_per_task=4, other_images=5))
    assert bank.fidelity["images_from"] == "validation images"
    assert bank.fidelity["images"] == [4, 4, 4] and bank.fidelity["other_images"] == [5, 5, 5]
    with pytest.raises(ValueError, match="check_images must have the training images' classes"):
        run(beta=1.0, check_images=_two_classes())
    with pytest.raises(ValueError, match="images_per_task must be a positive integer"):
        FidelitySettings(images_per_task=0)


def _two_classes():
    from nad_ext.data import ImageSet

    full = colour_images(per_class=2)
    return ImageSet(full.classes[:2], [0, 1], "two", images=full._images[:2])


def test_search_by_fidelity_finds_the_largest_beta_that_keeps_the_task():
    calls = []

    def measure(threshold):
        def m(beta):
            calls.append(beta)
            return {"keeps_task": beta < threshold, "open_ratio": 1 / (1 + beta), "balanced_accuracy": 1 / (1 + beta)}
        return m

    found = search_beta_by_fidelity(measure(0.8), bracket=(0.02, 5.0), runs=10, log=None)
    assert calls[:2] == [0.02, 5.0] and found["converged"]
    assert found["beta"] < 0.8 and found["beta"] > 0.8 / 1.2  # within the stopping width below the threshold
    assert all(row[3] == (row[0] < 0.8) for row in found["curve"])
    # Above the bracket: widened tenfold upwards; below: downwards.
    assert search_beta_by_fidelity(measure(120.0), bracket=(0.02, 5.0), runs=10, log=None)["beta"] > 50
    low = search_beta_by_fidelity(measure(0.001), bracket=(0.02, 5.0), runs=10, log=None)
    assert low["converged"] and low["beta"] < 0.001
    # Nothing keeps the task within the budget: the best balanced accuracy, not converged.
    none = search_beta_by_fidelity(measure(1e-9), bracket=(0.02, 5.0), runs=3, log=None)
    assert not none["converged"] and none["beta"] == pytest.approx(0.002)  # the smallest measured


def test_calibration_by_fidelity_keeps_the_tasks_where_an_open_ratio_target_collapses():
    """KnownChannels needs 2 of its 8 channels per task. An open-ratio target of 0.05 closes
    them all (every answer constant); calibrating by fidelity finds a beta that keeps them."""
    cfg = dict(beta="auto", target_open_ratio=0.05)
    settings = dict(epochs=2, runs=6, bracket=(0.1, 10.0))
    by_ratio, caught = run(**cfg, lr=0.5, calibration=CalibrationSettings(criterion="open_ratio", **settings))
    assert by_ratio.calibration["criterion"] == "open_ratio" and any(by_ratio.fidelity["constant"])
    assert caught and "beta was calibrated on a few tasks only" in str(caught[0].message)
    by_fidelity, caught = run(**cfg, lr=0.5, calibration=CalibrationSettings(**settings))
    cal = by_fidelity.calibration
    assert cal["criterion"] == "fidelity" and cal["method"].startswith("largest beta that keeps the task")
    assert caught == [] and not any(by_fidelity.fidelity["constant"])
    assert cal["converged"] and cal["beta"] < by_ratio.calibration["beta"]
    kept = [row for row in cal["curve"] if row[3]]
    assert cal["beta"] == max(row[0] for row in kept)
    assert all(len(row) == 4 for row in cal["curve"])  # beta, open ratio, balanced accuracy, keeps the task


def test_the_users_network_keeps_its_mode():
    """The check evaluates in eval mode and leaves every module as it found it (a network left in
    training mode would update BatchNorm statistics in the user's next forward)."""
    model = KnownChannels().eval()
    disentangle(Network(model, ["feat"], "known"), IMAGES, progress=False, config=NADConfig(**CFG))
    assert not any(m.training for m in model.modules())


def test_search_by_fidelity_without_a_keeping_beta_prefers_fewer_constant_answers():
    """No beta keeps the task: a constant answer scores 0.5 balanced accuracy, above a poor but
    varied one; the fallback still prefers the beta with fewer constant sub-architectures."""
    table = {0.02: (0, 0.497), 5.0: (3, 0.5), 0.002: (1, 0.49)}
    found = search_beta_by_fidelity(
        lambda b: {"keeps_task": False, "open_ratio": 0.5, "balanced_accuracy": table[b][1], "constant": table[b][0]},
        bracket=(0.02, 5.0), runs=3, log=None)
    assert not found["converged"] and found["beta"] == 0.02


def test_calibration_that_keeps_nothing_warns():
    cfg = dict(beta="auto", target_open_ratio=0.3)
    _, caught = run(**cfg, lr=1.0, calibration=CalibrationSettings(epochs=2, runs=2, bracket=(1000.0, 5000.0)))
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("beta calibration by fidelity: no beta of 2 short runs") for m in messages), messages
