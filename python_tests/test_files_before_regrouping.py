"""Files written before nad_ext was regrouped into subpackages still load, and mean the same.

python_tests/data/before_regrouping/ holds what nad-ext wrote at commit 1f421d4, when nad_ext was
28 flat modules: a zoo cache (``nad-ext.zoo/1``, gzipped here) and a one-epoch run folder (mask
bank ``nad-ext.maskbank/1``, its epoch copy, ``log.json``). Both were made for zoo_dense on the
generated shapes (4 classes, 6 training and 2 validation images each, 32 px): the zoo cache by
``models.load_zoo(..., epochs=1)`` with ``train_zoo_model`` replaced by weights set to the
pattern of :func:`patterned` (so that the file compresses to a few KB), the run by
``disentangle(model, train, "zoo_dense", model_id="zoo_dense", config=CONFIG)`` on that model.
"""
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from nad_ext import data, models
from nad_ext.gates import MaskBank
from nad_ext.training import NADConfig, Network, disentangle

FILES = Path(__file__).parent / "data" / "before_regrouping"
# fuse "off": the network as written, as the CPU ran it then (its default now folds BatchNorm,
# which changes float32 rounding); the execution settings may differ on resume.
CONFIG = dict(image_size=32, tasks_per_step=2, beta=0.02, data_pipeline="exact", fuse="off")


def patterned(model):
    """The weights the zoo cache holds: a period-7 pattern per tensor, BatchNorm variances 1."""
    return {k: (torch.ones_like(t) if k.endswith("running_var")
                else ((torch.arange(t.numel()) % 7 - 3).float() * 0.1).view_as(t)) if t.is_floating_point() else t
            for k, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def images():
    train = data.generated_shapes("train", num_classes=4, images_per_class=6, image_size=32)
    val = data.generated_shapes("val", num_classes=4, images_per_class=2, image_size=32)
    return train, val


@pytest.fixture
def zoo_model(images, tmp_path, monkeypatch):
    """zoo_dense from the old zoo cache, loaded by today's load_zoo without training."""
    cache = tmp_path / "zoo"
    cache.mkdir()
    packed = (FILES / "zoo" / "zoo_dense.safetensors.gz").read_bytes()
    (cache / "zoo_dense.safetensors").write_bytes(gzip.decompress(packed))

    def no_training(*args, **kwargs):
        raise AssertionError("the zoo cache written before the regrouping was not accepted")

    monkeypatch.setattr(models.zoo, "train_zoo_model", no_training)
    model, accuracy = models.load_zoo(cache, *images, names=["zoo_dense"], epochs=1, progress=False)["zoo_dense"]
    assert accuracy == 0.5
    return model


def test_the_zoo_cache_loads_with_its_weights(zoo_model):
    expected = patterned(zoo_model)
    assert all(torch.equal(t, expected[k]) for k, t in zoo_model.state_dict().items())
    assert not zoo_model.training and not any(p.requires_grad for p in zoo_model.parameters())


def test_the_mask_bank_loads_and_fits_todays_gated_model(zoo_model):
    bank = MaskBank.load(FILES / "run" / "masks.safetensors")
    assert (bank.model_id, bank.epoch, len(bank.tasks)) == ("zoo_dense", 1, 4)
    assert [p.name for p in bank.gate_points] == [
        "features.pool0", "features.denseblock1", "features.transition1", "features.denseblock2",
        "features.transition2", "features.norm5"]
    gated = Network(zoo_model, "zoo_dense", "zoo_dense").gated(len(bank.tasks), 32)
    bank.apply_to(gated)  # the preset still names the same gate points, with the same channels
    copy = MaskBank.load(FILES / "run" / "masks_epoch01.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(bank.logits, copy.logits))


def test_the_old_run_resumes_to_the_gates_of_an_uninterrupted_run(images, zoo_model, tmp_path):
    train, _ = images
    old = MaskBank.load(FILES / "run" / "masks.safetensors")
    # The old bank's gate points compare the gated outputs everywhere (it predates records);
    # today's zoo_dense preset compares relu(output) at features.norm5, as the authors' DenseNet
    # does (docs/METHOD.md). With the bank's own gate points the objective is the old one:
    assert [p.record for p in old.gate_points] == ["output"] * 6
    network = Network(zoo_model, old.gate_points, "zoo_dense")
    # today's code computes the old code's first epoch, bit for bit...
    first = disentangle(network, train, config=NADConfig(epochs=1, **CONFIG), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.logits, old.logits))
    # the settings added since, at their defaults (the paper's)
    assert first.config == {**old.config, "fuse": "off", "on_nonfinite": "stop", "gate": "soft",
                            "gate_temperature": 0.2}
    # ... and the old run folder continues where it stopped; with today's preset it is refused,
    # since its objective changed, with the gate points that continue it.
    run = tmp_path / "run"
    shutil.copytree(FILES / "run", run)
    with pytest.raises(ValueError, match=r"another objective: gate point 'features.norm5' records 'relu' now, "
                                         r"'output' in the bank.*--gate-points features.pool0,.*,features.norm5\)"):
        disentangle(Network(zoo_model, "zoo_dense", "zoo_dense"), train, config=NADConfig(epochs=2, **CONFIG),
                    out_dir=run, resume=True, progress=False)
    resumed = disentangle(network, train, config=NADConfig(epochs=2, **CONFIG), out_dir=run, resume=True,
                          progress=False)
    full = disentangle(network, train, config=NADConfig(epochs=2, **CONFIG), progress=False)
    assert resumed.epoch == 2 and all(torch.equal(a, b) for a, b in zip(resumed.logits, full.logits))
    log = json.loads((run / "log.json").read_text())["epochs"]
    assert log[0] == json.loads((FILES / "run" / "log.json").read_text())["epochs"][0] and log[1]["epoch"] == 2
    assert sorted(p.name for p in run.iterdir()) == [
        ".nad.lock", "log.json", "masks.safetensors", "masks_epoch01.safetensors", "masks_epoch02.safetensors"]
