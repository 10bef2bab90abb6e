"""The `nad` command line on small generated data: ImageFolder trees, weights files, errors."""
import json

import pytest
import torch
from PIL import Image

from nad_ext import cli, data, models
from nad_ext.maskbank import MaskBank


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A small ImageFolder tree (4 classes) written from the generated shapes."""
    root = tmp_path_factory.mktemp("tree")
    for split, n in (("train", 6), ("val", 3)):
        images = data.generated_shapes(split, num_classes=4, images_per_class=n, image_size=32)
        for i in range(len(images)):
            folder = root / split / images.classes[images.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images.load(i).permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "plain.pt"
    torch.save(models.get_spec("zoo_plain").build(4).state_dict(), path)
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_disentangle_resume_and_similarity(tree, weights, tmp_path, capsys):
    common = ["--model", "zoo_plain", "--weights", weights, "--data", tree, "--out", tmp_path / "run",
              "--image-size", 32, "--beta", 1.0]
    code, out, err = run(capsys, "disentangle", *common, "--epochs", 1)
    assert code == 0, err
    assert "zoo_plain: 6 gate points" in out
    bank = MaskBank.load(tmp_path / "run" / "masks.safetensors")
    assert bank.task_names == sorted(bank.task_names) and len(bank.tasks) == 4 and bank.epoch == 1
    code, _, err = run(capsys, "disentangle", *common, "--epochs", 2)
    assert code == 2 and "pass resume=True (--resume)" in err
    code, out, err = run(capsys, "disentangle", *common, "--epochs", 2, "--resume")
    assert code == 0, err
    assert MaskBank.load(tmp_path / "run" / "masks.safetensors").epoch == 2
    code, out, err = run(capsys, "similarity", "--bank", tmp_path / "run" / "masks.safetensors")
    assert code == 0, err
    rows = out.strip().splitlines()
    assert len(rows) == 5 and rows[0].startswith("task,")
    assert rows[1].split(",")[1] == "1.000000"  # a task is identical to itself


def test_tasks_file(tree, weights, tmp_path, capsys):
    classes = sorted(p.name for p in (tree / "train").iterdir())
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"first-two": classes[:2], "last": classes[3:]}))
    code, _, err = run(capsys, "disentangle", "--model", "zoo_plain", "--weights", weights, "--data", tree,
                       "--out", tmp_path / "t", "--image-size", 32, "--beta", 1.0, "--epochs", 1, "--tasks", tasks)
    assert code == 0, err
    assert MaskBank.load(tmp_path / "t" / "masks.safetensors").task_names == ["first-two", "last"]
    tasks.write_text(json.dumps({"bad": ["no-such-class"]}))
    code, _, err = run(capsys, "disentangle", "--model", "zoo_plain", "--weights", weights, "--data", tree,
                       "--out", tmp_path / "t2", "--image-size", 32, "--beta", 1.0, "--tasks", tasks)
    assert code == 2 and "unknown classes ['no-such-class']" in err


def test_gate_points_listing(tree, weights, capsys):
    code, out, err = run(capsys, "gate-points", "--model", "zoo_residual", "--data", tree, "--image-size", 32,
                         "--weights", _residual_weights(weights.parent))
    assert code == 0, err
    assert "layer1.0" in out and "7 gate points" in out
    code, out, _ = run(capsys, "gate-points", "--model", "zoo_residual", "--data", tree, "--image-size", 32,
                       "--weights", _residual_weights(weights.parent), "--auto")
    assert code == 0 and "relu" in out


def _residual_weights(folder):
    path = folder / "residual.safetensors"
    if not path.exists():
        from safetensors.torch import save_file

        save_file(models.get_spec("zoo_residual").build(4).state_dict(), str(path))
    return path


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--gate-points", "features.99"], "gate point 'features.99' is not a module"),
    (["--beta", "-2"], "beta must be a positive number"),
    (["--lr", "0"], "lr must be a positive number"),
    (["--negatives", "1"], "needs both negatives > 0 and negative_weight > 0"),
])
def test_bad_input_is_reported(tree, weights, tmp_path, capsys, args, message):
    base = {"--data": tree, "--gate-points": None, "--beta": 1.0, "--lr": None}
    argv = ["disentangle", "--model", "zoo_plain", "--weights", weights, "--out", tmp_path / "x", "--image-size", 32]
    merged = dict(base)
    merged.update(dict(zip(args[::2], args[1::2])))
    for key, value in merged.items():
        if value is not None:
            argv += [key, value]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_weights_for_another_architecture(tree, tmp_path, capsys):
    code, _, err = run(capsys, "disentangle", "--model", "zoo_plain", "--weights", _residual_weights(tmp_path),
                       "--data", tree, "--out", tmp_path / "x", "--image-size", 32, "--beta", 1.0)
    assert code == 2 and "does not fit model 'zoo_plain'" in err


def test_bank_for_another_model_is_refused(tree, weights, tmp_path, capsys):
    code, _, err = run(capsys, "disentangle", "--model", "zoo_plain", "--weights", weights, "--data", tree,
                       "--out", tmp_path / "p", "--image-size", 32, "--beta", 1.0, "--epochs", 1)
    assert code == 0, err
    code, _, err = run(capsys, "analyze", "--model", "zoo_residual", "--weights", _residual_weights(tmp_path),
                       "--data", tree, "--bank", tmp_path / "p" / "masks.safetensors", "--out", tmp_path / "a")
    assert code == 2 and "mask bank does not match the model" in err


def test_analyze_then_report(tree, weights, tmp_path, capsys):
    from nad_ext.objective import SELECTIVE_DEFAULTS

    code, out, err = run(capsys, "disentangle", "--model", "zoo_plain", "--weights", weights, "--data", tree,
                         "--out", tmp_path / "run", "--image-size", 32, "--beta", 1.0, "--epochs", 1,
                         "--selective", "--negatives", 0.5)
    assert code == 0, err
    config = MaskBank.load(tmp_path / "run" / "masks.safetensors").config
    assert (config["negatives"], config["negative_weight"]) == (0.5, SELECTIVE_DEFAULTS["negative_weight"])
    assert "objective: selective (negatives 0.5" in out
    code, out, err = run(capsys, "analyze", "--model", "zoo_plain", "--weights", weights, "--data", tree,
                         "--bank", tmp_path / "run" / "masks.safetensors", "--out", tmp_path / "zoo_plain",
                         "--mosaics", 2)
    assert code == 0, err
    assert (tmp_path / "zoo_plain" / "results.json").is_file()
    code, out, err = run(capsys, "report", tmp_path / "zoo_plain", "--out", tmp_path / "report.html")
    assert code == 0, err
    html = (tmp_path / "report.html").read_text()
    assert "zoo_plain" in html and html.count('src="data:image/png;base64,') >= 3
    assert "Objective: selective (negatives 0.5" in html  # the report says which objective made the bank
    code, _, err = run(capsys, "report", tmp_path / "nothing-here", "--out", tmp_path / "r2.html")
    assert code == 2 and "results.json does not exist" in err
