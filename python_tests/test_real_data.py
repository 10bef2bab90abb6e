"""The fidelity check and beta calibration on real data (issue 27): scikit-learn's digits (shipped
in the wheel, python_tests/real_digits.py) and a small plain CNN trained here to >= 95% on them.

What these tests establish on this network, with the paper's objective at the tests' budget of
8 epochs (lr 0.1; measured 2026-12-03, benchmarks/eval_real_data.py has the whole table):

- a run whose sub-architectures collapse (every one answers its own class for every image) is
  named by a FidelityWarning and flagged in bank.fidelity;
- the collapse does not come from beta alone here: at 8 epochs every beta tried, 0.0002 to 50,
  leaves at least 8 of 10 sub-architectures constant (at 21 epochs beta 0.1 and 0.02 leave 4 and
  2, probably because the gates start at N(0, 1) logits, half of them closed, and need updates
  to reopen). So calibration by fidelity on short runs (2 epochs) finds no beta that keeps the
  task and says so (``converged`` False, every point of its curve "loses the task"), and its
  full run is flagged, as is the open-ratio criterion's: on this network calibration by
  fidelity does not avoid the collapse that the open-ratio target causes (issue 27 expects it to);
- the check's figures (a small sample of val) and masked_accuracy on all of val agree in
  direction: which tasks are constant, and which of two runs is better.

- the selective variant's defaults (gates annealed towards binary while they train) hold on this
  network at beta 0.1 and 21 epochs, where the same objective with soft gates loses own-class
  accuracy at binarisation (benchmarks/RESULTS.md, "The selective variant on real data").

Everything runs on one thread (two are several times slower on a loaded 2-core machine).
"""
import warnings

import pytest
import torch

from nad_ext import analysis
from nad_ext.training import (SELECTIVE_DEFAULTS, CalibrationSettings, FidelityWarning, NADConfig, Network,
                              build_gated_model, disentangle)

pytest.importorskip("sklearn", reason="the digits images ship inside scikit-learn (requirements.txt)")

import real_digits  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with real_digits.threads(1):
        yield


@pytest.fixture(scope="module")
def digits():
    return real_digits.digits_cnn()


def run(digits, beta, epochs=8, calibration=None, **objective):
    train, val, model, _ = digits
    config = NADConfig(beta=beta, epochs=epochs, image_size=real_digits.IMAGE_SIZE, tasks_per_step=10, device="cpu",
                       keep_every_epoch=False, **objective)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = disentangle(Network(model, real_digits.GATE_POINTS, "digits_cnn"), train, config=config,
                           progress=False, check_images=val, calibration=calibration)
    return bank, [str(w.message) for w in caught if issubclass(w.category, FidelityWarning)]


def masked(digits, bank):
    _, val, model, _ = digits
    gated = build_gated_model(model, real_digits.GATE_POINTS, len(bank.tasks), real_digits.IMAGE_SIZE,
                              model_id="digits_cnn")
    return analysis.masked_accuracy(gated, bank, val, real_digits.IMAGE_SIZE)


@pytest.fixture(scope="module")
def collapsed(digits):
    """The paper's objective at beta 1, 8 epochs: every sub-architecture answers its own class."""
    return run(digits, 1.0)


def test_the_digits_split_is_fixed_and_per_class():
    train, val = real_digits.digit_sets()
    again_train, again_val = real_digits.digit_sets()
    assert (len(train), len(val)) == (1438, 359) and train.labels == again_train.labels
    assert torch.equal(val.tensor, again_val.tensor) and val.tensor.shape[1:] == (3, 32, 32)
    assert val.tensor.dtype == torch.uint8 and train.classes == [str(c) for c in range(10)]
    for c in range(10):  # 20% of every class in val
        n_val, n_all = len(val.indices_of_class(c)), len(val.indices_of_class(c)) + len(train.indices_of_class(c))
        assert n_val == round(0.2 * n_all)


@pytest.mark.slow
def test_the_cnn_is_a_real_network(digits):
    assert digits[3] >= 0.95


@pytest.mark.slow
def test_a_collapsing_run_on_real_data_is_named_and_flagged(collapsed):
    bank, caught = collapsed
    fid = bank.fidelity
    assert fid["images_from"] == "validation images"
    assert len(caught) == 1
    flagged = [name for name, _ in fid["flagged"]]
    assert len(flagged) >= 8 and sum(fid["constant"]) >= 8
    assert caught[0].startswith(f"{len(flagged)} of 10 sub-architectures do not do their task: '{flagged[0]}' (")
    assert "try a smaller beta than 1 (e.g. a tenth)" in caught[0]
    # The original network does the task on the same images; the sub-architectures do not.
    assert min(fid["original_own_class_accuracy"]) >= 0.8
    assert sum(fid["balanced_accuracy"]) / 10 < 0.6


@pytest.mark.slow
def test_calibration_on_real_data_says_when_no_beta_keeps_the_task(digits):
    """On this network at 8 epochs no beta keeps the task under the paper's objective (see the
    module's docstring): calibration by fidelity finds none, says so (not converged, every point of
    the curve loses the task, a warning) and its full run is flagged with a warning that says beta
    was calibrated; the open-ratio criterion converges to its target, and its full run collapses."""
    settings = dict(num_tasks=3, epochs=2, runs=4)
    by_fidelity, caught = run(digits, "auto", epochs=4, calibration=CalibrationSettings(**settings))
    cal = by_fidelity.calibration
    assert cal["criterion"] == "fidelity" and cal["images_from"] == "validation images"
    assert not cal["converged"] and len(cal["curve"]) == 4
    assert not any(keeps for *_, keeps in cal["curve"])
    assert min(row[0] for row in cal["curve"]) < 0.02  # it looked below the paper's range
    # Two warnings: the calibration found no beta that keeps the tasks (its runs are shorter than
    # the full run), and the full run's check flags tasks, saying beta was calibrated.
    assert len(caught) == 2 and caught[0].startswith("beta calibration by fidelity: no beta of 4 short runs")
    assert "updates per task against" in caught[0]
    assert by_fidelity.fidelity["flagged"] and "beta was calibrated on a few tasks only" in caught[1]
    by_ratio, caught = run(digits, "auto", epochs=4, calibration=CalibrationSettings(criterion="open_ratio", **settings))
    assert by_ratio.calibration["criterion"] == "open_ratio" and by_ratio.calibration["converged"]
    assert len(by_ratio.fidelity["flagged"]) >= 8 and caught


@pytest.mark.slow
def test_masked_accuracy_agrees_with_the_fidelity_figures(digits, collapsed):
    """The check's figures (16 + 64 val images per task) and masked_accuracy (all of val) point
    the same way: the tasks the check calls constant score near chance on val, the original
    network's figures match, and of two runs (collapsed; the selective objective at beta 0.1,
    less collapsed) both rank the same one higher."""
    paper, _ = collapsed
    selective, _ = run(digits, 0.1, **SELECTIVE_DEFAULTS)
    scores = []
    for bank in (paper, selective):
        fid, full = bank.fidelity, masked(digits, bank)
        for t, row in enumerate(full["tasks"]):
            assert abs(row["original_own_class_accuracy"] - fid["original_own_class_accuracy"][t]) <= 0.15
            if fid["constant"][t]:
                assert abs(row["balanced_accuracy"] - 0.5) <= 0.1, (row, t)
            assert abs(row["own_class_accuracy"] - fid["own_class_accuracy"][t]) <= 0.35, (row, t)
        scores.append((sum(fid["balanced_accuracy"]) / 10, full["mean"]["balanced_accuracy"]))
    (paper_check, paper_val), (selective_check, selective_val) = scores
    assert selective_check > paper_check and selective_val > paper_val
    assert len(selective.fidelity["flagged"]) < len(paper.fidelity["flagged"])


@pytest.mark.slow
def test_selective_defaults_hold_on_real_data(digits):
    """Issue 27, item 3: the selective defaults (r 0.25, gamma 2, gates annealed to 0.2) at beta 0.1
    and the paper's 21 epochs keep own-class accuracy within 5 points of the original network's
    with at most 20% false positives on this network (seed 0: 96.9% against 98.0%, 15.9%); the same
    objective with the paper's soft gates loses more than 5 points at binarisation (87.8%)."""
    annealed, _ = run(digits, 0.1, epochs=21, **SELECTIVE_DEFAULTS)
    soft, _ = run(digits, 0.1, epochs=21, **{**SELECTIVE_DEFAULTS, "gate": "soft"})
    assert annealed.config["gate"] == "annealed" and soft.config["gate"] == "soft"
    kept, lost = masked(digits, annealed)["mean"], masked(digits, soft)["mean"]
    assert kept["own_class_accuracy"] >= kept["original_own_class_accuracy"] - 0.05
    assert kept["false_positive_rate"] <= 0.20
    assert not annealed.fidelity["flagged"]
    assert lost["own_class_accuracy"] < kept["own_class_accuracy"] - 0.05
