"""The `nad` command line on small generated data: ImageFolder trees, weights files, errors."""
import argparse
import json
import subprocess
import sys

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
    assert code == 2 and "pass --resume to continue that run, or --overwrite" in err and "resume=True" not in err
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
    code, _, err = run(capsys, "disentangle", "--model", "zoo_plain", "--weights", weights, "--data", tree,
                       "--out", tmp_path / "run", "--image-size", 32, "--beta", 1.0, "--epochs", 1)
    assert code == 0, err
    code, out, err = run(capsys, "analyze", "--model", "zoo_plain", "--weights", weights, "--data", tree,
                         "--bank", tmp_path / "run" / "masks.safetensors", "--out", tmp_path / "zoo_plain",
                         "--mosaics", 2)
    assert code == 0, err
    assert (tmp_path / "zoo_plain" / "results.json").is_file()
    code, out, err = run(capsys, "report", tmp_path / "zoo_plain", "--out", tmp_path / "report.html")
    assert code == 0, err
    html = (tmp_path / "report.html").read_text()
    assert "zoo_plain" in html and html.count('src="data:image/png;base64,') >= 3
    code, _, err = run(capsys, "report", tmp_path / "nothing-here", "--out", tmp_path / "r2.html")
    assert code == 2 and "results.json does not exist" in err


def test_parsing_and_help_do_not_import_torch():
    """`nad --help` and argument errors answer before torch (seconds to import) is loaded."""
    code = ("import sys\n"
            "import nad_ext.cli as cli\n"
            "cli.build_parser().parse_args(['disentangle', '--model', 'vgg16', '--out', 'x', '--lr', '0.2'])\n"
            "try:\n"
            "    cli.main(['--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'torchvision', 'matplotlib') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "usage: nad" in out


def test_version(capsys):
    import nad_ext

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"nad {nad_ext.__version__}"


def _options():
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for verb, sub in verbs.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                yield verb, sub, action


def test_every_option_has_help_and_shows_its_default():
    for verb, sub, action in _options():
        name = f"{verb} {action.option_strings or action.dest}"
        assert action.help, f"{name} has no help text"
        text = " ".join(sub.format_help().split())
        help_text = " ".join(action.help.split())
        assert help_text in text, name
        if action.option_strings and not action.required and action.nargs != 0:
            shown = f"(default: {action.default})" if action.default is not None else "(default: "
            after = text[text.index(help_text):][:len(help_text) + 40]
            assert shown in after, f"{name} does not show its default"


def test_defaults_shown_are_the_ones_used():
    from nad_ext import demo
    from nad_ext.trainer import NADConfig

    parser = cli.build_parser()
    args = parser.parse_args(["disentangle", "--model", "vgg16", "--out", "x"])
    assert cli._config_from_args(args) == NADConfig()
    args = parser.parse_args(["demo"])
    assert (args.epochs, args.mosaics) == (demo.DEMO_EPOCHS, demo.DEMO_MOSAICS)


def test_unknown_model_is_named_first_with_the_known_ones(tmp_path, capsys):
    code, _, err = run(capsys, "disentangle", "--model", "nosuchmodel", "--out", tmp_path / "x")
    assert code == 2 and "unknown model 'nosuchmodel'" in err and "zoo_plain" in err and "weights" not in err
    code, _, err = run(capsys, "disentangle", "--model", "vgg16", "--out", tmp_path / "x")
    assert code == 2 and "--weights is required for vgg16" in err


def test_a_corrupt_weights_file_is_named_without_unsafe_advice(tree, tmp_path, capsys):
    for name, content in (("garbage.pth", b"\x80\x02garbage"), ("model.pth", None)):
        path = tmp_path / name
        if content is None:
            torch.save(models.get_spec("zoo_plain").build(4), path)  # a whole pickled model
        else:
            path.write_bytes(content)
        code, _, err = run(capsys, "disentangle", "--model", "zoo_plain", "--weights", path, "--data", tree,
                           "--out", tmp_path / "x", "--image-size", 32)
        assert code == 2 and f"weights file {path} is not a valid state dict" in err
        assert "weights_only" not in err and "issue" not in err and err.count("\n") == 1
