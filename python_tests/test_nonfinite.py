"""Non-finite gate gradients (nad_ext/training/nonfinite.py): a NaN planted in one task's
gradient stops the run, naming the task, gate point and epoch, with the run folder at its last
committed epoch; or, with on_nonfinite="skip", that task's steps are skipped and counted in
log.json while the other tasks train as in a clean run."""
import json

import pytest
import torch

from nad_ext._utils import faults
from nad_ext.gates import MaskBank
from nad_ext.training import NADConfig, Network, NonFiniteGradientError, disentangle
from nad_ext.training.nonfinite import guard_step
from test_trainer import KnownChannels, colour_images


class PoisonedChannels(KnownChannels):
    """KnownChannels whose masked passes (the ones with gradients) turn the features of class
    1's images into NaN, after the gate point ``feat``, from epoch ``at`` on: task c1's gate
    gradient is NaN there; the original network and the other tasks are untouched."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.epoch = at, 0

    def forward(self, x):
        h = self.feat(self.conv(x))
        if torch.is_grad_enabled() and self.epoch >= self.at:
            class_1 = h[:, 2].mean(dim=(1, 2)) > 0.1  # channels 2 and 3 answer to class 1 only
            h = h * torch.where(class_1, float("nan"), 1.0)[:, None, None, None]
        return self.fc(self.pool(h).flatten(1))


# fuse "off": the network as written runs the model itself, whose epoch step_event sets (the CPU's
# default folds BatchNorm on a copy of it).
CFG = dict(beta=1.0, epochs=2, image_size=16, batch_size=16, tasks_per_step=3, fuse="off")


def run(monkeypatch, poison_at, out, resume=False, **config):
    model = PoisonedChannels(poison_at)
    monkeypatch.setattr(faults, "step_event", lambda epoch, step: setattr(model, "epoch", epoch))
    return disentangle(Network(model, ["feat"], "known"), colour_images(per_class=40), progress=False,
                       out_dir=out, resume=resume, config=NADConfig(**{**CFG, **config}))


def test_guard_flags_rows_and_skips_the_whole_task():
    grads = [torch.randn(4, 3), torch.randn(4, 5)]
    grads[1][2, 4] = float("nan")
    grads[0][3, 0] = float("inf")  # task 3 is not in the step: not flagged (its row is not used)
    guarded, flags = guard_step(grads, torch.tensor([0, 1, 2]))
    assert flags.tolist() == [[False, False], [False, False], [False, True], [False, False]]
    assert (guarded[0][2] == 0).all() and (guarded[1][2] == 0).all()  # every gate point of task 2
    for g, original in zip(guarded, grads):
        torch.testing.assert_close(g[:2], original[:2])


@pytest.mark.parametrize("mode", ["paper", "batched"])
def test_a_nan_stops_the_run_naming_task_gate_point_and_epoch(monkeypatch, tmp_path, mode):
    clean = run(monkeypatch, poison_at=99, out=None, epochs=1, mode=mode)
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gate gradient \(NaN or Inf\) in epoch 2: task "
                                                     r"'c1' at gate point 'feat'\..*epoch 2 was not committed.*"
                                                     r"last committed epoch \(1\).*--on-nonfinite skip"):
        run(monkeypatch, poison_at=2, out=tmp_path, mode=mode)
    bank = MaskBank.load(tmp_path / "masks.safetensors")  # the last committed epoch, intact
    assert bank.epoch == 1 and all(torch.equal(a, b) for a, b in zip(bank.logits, clean.logits))
    assert not (tmp_path / "masks_epoch02.safetensors").exists()
    log = json.loads((tmp_path / "log.json").read_text())["epochs"]
    assert [e["epoch"] for e in log] == [1] and log[0]["nonfinite_steps"] == [0, 0, 0]
    # the folder is free again: the run continues from epoch 1, skipping those steps
    resumed = run(monkeypatch, poison_at=2, out=tmp_path, resume=True, mode=mode, on_nonfinite="skip")
    assert resumed.epoch == 2
    # the same holds when the first epoch breaks: nothing is committed
    with pytest.raises(NonFiniteGradientError, match="in epoch 1: task 'c1'.*last committed epoch \\(none yet\\)"):
        run(monkeypatch, poison_at=1, out=tmp_path / "new", mode=mode)
    assert not (tmp_path / "new" / "masks.safetensors").exists()


@pytest.mark.parametrize("mode", ["paper", "batched"])
def test_skip_leaves_the_task_unchanged_and_counts_its_steps(monkeypatch, tmp_path, mode):
    clean = run(monkeypatch, poison_at=99, out=None, mode=mode)
    skipped = run(monkeypatch, poison_at=2, out=tmp_path, mode=mode, on_nonfinite="skip")
    after_one = MaskBank.load(tmp_path / "masks_epoch01.safetensors")
    for ours, theirs, first in zip(skipped.logits, clean.logits, after_one.logits):
        assert torch.isfinite(ours).all()
        assert torch.equal(ours[1], first[1])  # task c1: every step of epoch 2 skipped
        assert torch.equal(ours[[0, 2]], theirs[[0, 2]])  # the others: as in a clean run
        assert not torch.equal(ours[0], first[0])
    log = json.loads((tmp_path / "log.json").read_text())["epochs"]  # valid JSON: no NaN in it
    assert log[0]["nonfinite_steps"] == [0, 0, 0] and log[1]["nonfinite_steps"] == [0, 3, 0]  # 40 images: 3 batches
    assert log[1]["loss"][1] == 0 and log[1]["loss"][0] > 0  # a skipped step's terms are not averaged
    assert skipped.config["on_nonfinite"] == "skip"


def test_on_nonfinite_is_checked():
    with pytest.raises(ValueError, match="on_nonfinite must be one of stop, skip"):
        NADConfig(beta=1.0, on_nonfinite="ignore").validate()
