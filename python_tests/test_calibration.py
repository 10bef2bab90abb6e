"""Beta calibration: the log-space bisection on a known curve, and disentangle with
NADConfig(beta="auto") on a zoo network (short runs), with the curve stored in the bank."""
import math

import pytest

from nad_ext import data, models
from nad_ext.gates import MaskBank
from nad_ext.training import CalibrationSettings, NADConfig, Network, calibrate_beta, disentangle, search_beta


def falling(beta_half: float):
    """An open ratio that falls smoothly with log(beta): 0.5 at beta_half."""
    return lambda beta: 1.0 / (1.0 + (beta / beta_half) ** 0.7)


def test_bisection_in_log_space_on_a_known_curve():
    calls = []
    measure = falling(0.37)
    found = search_beta(lambda b: (calls.append(b), measure(b))[1], 0.3, bracket=(0.02, 5.0), runs=12,
                        tolerance=0.01, log=None)
    assert calls[:2] == [0.02, 5.0]
    # Every later beta is the geometric mean of the bracket that holds the target.
    low, high = 0.02, 5.0
    for beta in calls[2:]:
        assert beta == pytest.approx(math.sqrt(low * high))
        low, high = (beta, high) if measure(beta) > 0.3 else (low, beta)
    assert found["converged"] and abs(found["open_ratio"] - 0.3) <= 0.01
    exact = 0.37 * (0.7 / 0.3) ** (1 / 0.7)  # measure(exact) == 0.3
    assert abs(math.log(found["beta"] / exact)) < 0.1
    assert found["runs"] == len(calls) and [b for b, _ in found["curve"]] == sorted(calls)
    assert found["method"] == "bisection in log(beta)" and found["target_open_ratio"] == 0.3


def test_the_bracket_widens_when_the_target_lies_outside_it():
    found = search_beta(falling(200.0), 0.3, bracket=(0.02, 5.0), runs=8, tolerance=0.02, log=None)
    assert [b for b, _ in found["curve"]][-1] >= 50.0  # widened tenfold, at least twice
    assert found["converged"]
    # A budget too small to get there: the closest measurement, marked as not converged.
    short = search_beta(falling(200.0), 0.3, bracket=(0.02, 5.0), runs=3, tolerance=0.02, log=None)
    assert not short["converged"] and short["beta"] == 50.0 and short["runs"] == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=1.5), "target_open_ratio"), (dict(bracket=(5.0, 0.02)), "bracket"),
    (dict(runs=1), "runs"), (dict(tolerance=0.0), "tolerance"),
])
def test_bad_search_arguments_are_named(kwargs, match):
    target = kwargs.pop("target", 0.3)
    with pytest.raises(ValueError, match=match):
        search_beta(falling(1.0), target, log=None, **kwargs)


@pytest.fixture(scope="module")
def zoo_vit():
    """The zoo's vision transformer, trained for one epoch on a small set (fast, not good)."""
    train = data.generated_shapes("train", num_classes=4, images_per_class=24)
    val = data.generated_shapes("val", num_classes=4, images_per_class=4)
    model, _ = models.train_zoo_model("zoo_vit", train, val, epochs=1, progress=False)
    return model, train


@pytest.mark.slow
def test_beta_auto_calibrates_and_the_bank_says_how(zoo_vit, tmp_path, capsys):
    model, train = zoo_vit
    settings = CalibrationSettings(num_tasks=2, images_per_task=16, epochs=2, runs=3, criterion="open_ratio")
    config = NADConfig(epochs=1, image_size=64, tasks_per_step=4)
    network = Network(model, "zoo_vit", "zoo_vit")
    with pytest.raises(ValueError, match="'zoo_vit' has no tuned beta.*beta='auto'"):
        disentangle(network, train, config=config, progress=False)
    auto = NADConfig(**{**vars(config), "beta": "auto", "target_open_ratio": 0.3})
    bank = disentangle(network, train, config=auto, calibration=settings, out_dir=tmp_path / "run")
    printed = capsys.readouterr().out
    assert "calibrating beta for zoo_vit" in printed and "open ratio" in printed
    cal = bank.calibration
    assert cal["tasks"] == [train.classes[0], train.classes[3]] and cal["epochs"] == 2
    # 2 epochs of one batch of 16 images against the run's 1 epoch of two batches (24 images).
    assert cal["updates_per_task"] == 2 and cal["run_updates_per_task"] == 2
    assert 2 <= cal["runs"] <= 3 and len(cal["curve"]) == cal["runs"]
    assert bank.config["beta"] == cal["beta"] and bank.config["target_open_ratio"] == 0.3
    assert [r for _, r in cal["curve"]][0] >= [r for _, r in cal["curve"]][-1]  # fewer open at larger beta
    # The bank on disk says the same; a run with the beta found measures the ratio recorded.
    loaded = MaskBank.load(tmp_path / "run" / "masks.safetensors")
    assert loaded.calibration == cal
    again = calibrate_beta(network, train, config=config, progress=False,
                           settings=CalibrationSettings(num_tasks=2, images_per_task=16, epochs=2, runs=2,
                                                        bracket=(cal["beta"], cal["beta"] * 10),
                                                        criterion="open_ratio"))
    assert again["curve"][0] == [cal["beta"], cal["open_ratio"]]
    # Resuming keeps the bank's beta (no second calibration).
    resumed = disentangle(network, train, config=NADConfig(**{**vars(auto), "epochs": 2}), out_dir=tmp_path / "run",
                          resume=True, progress=False)
    assert resumed.epoch == 2 and resumed.calibration == cal and resumed.config["beta"] == cal["beta"]


def test_calibration_settings_are_checked(zoo_vit):
    model, train = zoo_vit
    with pytest.raises(ValueError, match="images_per_task"):
        calibrate_beta(Network(model, "zoo_vit", "zoo_vit"), train, progress=False,
                       settings=CalibrationSettings(images_per_task=0))
    with pytest.raises(ValueError, match="target_open_ratio"):
        calibrate_beta(Network(model, "zoo_vit", "zoo_vit"), train, progress=False, target_open_ratio=0.0)
    with pytest.raises(ValueError, match="target_open_ratio"):
        NADConfig(beta="auto", target_open_ratio=1.0).validate()
    with pytest.raises(ValueError, match="criterion must be one of fidelity, open_ratio, got 'accuracy'"):
        calibrate_beta(Network(model, "zoo_vit", "zoo_vit"), train, progress=False,
                       settings=CalibrationSettings(criterion="accuracy"))
