"""The `nad` command line on small generated data: ImageFolder trees, weights files, errors."""
import argparse
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from nad_ext import cli, data, models
from nad_ext.cli import common
from nad_ext.gates import MaskBank


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
    from nad_ext.training import SELECTIVE_DEFAULTS

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


def test_gate_points_of_a_transformer_preset(tree, capsys):
    code, out, err = run(capsys, "gate-points", "--model", "swin_t", "--data", tree, "--image-size", 64,
                         "--units", "heads")
    assert code == 0, err
    assert "swin_t: input 64x64, normalisation mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225), " \
           "beta none tuned" in out
    assert "features.1.0.attn" in out and "(N, H, W, heads, head_dim) heads (16, 16, 3, 32), axis 3" in out
    assert out.strip().endswith("12 gate points, 138 heads")
    code, out, err = run(capsys, "gate-points", "--model", "convnext_tiny", "--data", tree, "--image-size", 64)
    assert code == 0, err
    assert "features.1.0" in out and "(N, C, H, W) map (96, 16, 16), axis 1" in out
    code, out, err = run(capsys, "gate-points", "--model", "convnext_tiny", "--data", tree, "--units", "heads")
    assert code == 2 and "no 'heads' gate-point preset" in err


def test_calibrate_and_disentangle_with_beta_auto(tree, tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in models.get_spec("zoo_vit").build(4).state_dict().items()}, str(weights))
    common = ["--model", "zoo_vit", "--weights", weights, "--data", tree, "--image-size", 64]
    code, out, err = run(capsys, "calibrate", *common, "--num-tasks", 2, "--epochs", 1, "--runs", 2,
                         "--by", "open-ratio", "--target-open-ratio", 0.4, "--out", tmp_path / "cal.json")
    assert code == 0, err
    assert "calibrating beta for zoo_vit: target open ratio 0.40" in out and "beta = " in out
    found = json.loads((tmp_path / "cal.json").read_text())
    assert found["runs"] == 2 and len(found["curve"]) == 2 and found["target_open_ratio"] == 0.4
    code, out, err = run(capsys, "disentangle", *common, "--out", tmp_path / "run", "--epochs", 1, "--beta", "auto")
    assert code == 0, err
    bank = MaskBank.load(tmp_path / "run" / "masks.safetensors")
    assert bank.calibration is not None and bank.config["beta"] == bank.calibration["beta"]
    # beta auto calibrates by fidelity unless told otherwise; the run's own check read val/
    assert bank.calibration["criterion"] == "fidelity" and bank.calibration["images_from"] == "validation images"
    assert bank.fidelity is not None and bank.fidelity["images_from"] == "validation images"
    assert "calibrating beta for zoo_vit: the largest beta whose sub-architectures keep" in out
    code, out, err = run(capsys, "disentangle", *common, "--out", tmp_path / "run2", "--epochs", 1)
    assert code == 2 and "no tuned beta" in err and "--beta auto" in err
    with pytest.raises(SystemExit):
        cli.main(["disentangle", *map(str, common), "--out", str(tmp_path / "x"), "--beta", "fast"])


def _disentangle_args(tree, weights, out, *extra):
    return ["disentangle", "--model", "zoo_plain", "--weights", weights, "--data", tree, "--out", out,
            "--image-size", 32, "--beta", 1.0, "--epochs", 1, *extra]


def test_resume_without_a_bank_says_so_in_one_line(tree, weights, tmp_path, capsys):
    code, _, err = run(capsys, *_disentangle_args(tree, weights, tmp_path / "new", "--resume", "--fidelity-check", "off"))
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note" in line or "bank" in line]  # the rest: progress bars
    assert notes == [f"note: resume: {tmp_path / 'new'} has no mask bank yet: starting a new run"]
    code, _, err = run(capsys, *_disentangle_args(tree, weights, tmp_path / "other", "--strict-resume"))
    assert code == 2 and "cannot resume" in err and "has no mask bank" in err
    assert not (tmp_path / "other" / "masks.safetensors").exists()


def test_a_full_disk_is_reported_without_a_traceback(tree, weights, tmp_path, capsys):
    from nad_ext._utils import faults

    out = tmp_path / "run"
    assert run(capsys, *_disentangle_args(tree, weights, out))[0] == 0
    faults.configure("at=write:5,action=enospc")  # epoch 2: log.json written, not yet in place
    try:
        code, _, err = run(capsys, *_disentangle_args(tree, weights, out, "--epochs", 2, "--resume"))
    finally:
        faults.configure(None)
    assert code == 2 and "Traceback" not in err
    assert f"error: cannot write {out / 'log.json'}: No space left on device" in err
    assert "intact at its last committed epoch 1" in err and "rerun the same command with --resume" in err
    assert MaskBank.load(out / "masks.safetensors").epoch == 1
    code, _, err = run(capsys, *_disentangle_args(tree, weights, out, "--epochs", 2, "--resume"))
    assert code == 0, err
    assert MaskBank.load(out / "masks.safetensors").epoch == 2


def test_a_second_run_in_one_folder_is_refused(tree, weights, tmp_path, capsys):
    import os

    from nad_ext.training.rundir import RunDir

    with RunDir.open(tmp_path / "run"):
        code, _, err = run(capsys, *_disentangle_args(tree, weights, tmp_path / "run"))
    assert code == 2 and f"is in use by process {os.getpid()}" in err and "Traceback" not in err


def test_damaged_and_old_banks(tree, weights, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    assert run(capsys, *_disentangle_args(tree, weights, tmp_path / "run"))[0] == 0
    bank = tmp_path / "run" / "masks.safetensors"
    with safe_open(str(bank), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={k: v for k, v in meta.items() if k != "crc32"})
    code, out, err = run(capsys, "similarity", "--bank", old)
    assert code == 0 and len(out.splitlines()) == 5
    assert err.startswith("note: mask bank") and "has no checksums" in err and len(err.splitlines()) == 1
    raw = bytearray(bank.read_bytes())
    raw[-6:-1] = bytes(b ^ 0x5A for b in raw[-6:-1])
    bank.write_bytes(bytes(raw))
    code, _, err = run(capsys, "similarity", "--bank", bank)
    last = f"logits.{len(tensors) - 1:03d}"
    assert code == 2 and f"tensor '{last}' (gate point '" in err and "fails its CRC-32 check" in err


def test_python_m_nad_ext_is_the_nad_command(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "nad_ext", "similarity", "--bank", str(tmp_path / "none.safetensors")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: mask bank") and "does not exist" in result.stderr
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
    from nad_ext.training import NADConfig

    parser = cli.build_parser()
    args = parser.parse_args(["disentangle", "--model", "vgg16", "--out", "x"])
    assert common.config_from_args(args) == NADConfig()
    from nad_ext.training import SELECTIVE_DEFAULTS

    assert common.SELECTIVE == SELECTIVE_DEFAULTS  # what --help says --selective means
    args = parser.parse_args(["disentangle", "--model", "vgg16", "--out", "x", "--selective"])
    assert common.config_from_args(args) == NADConfig(**SELECTIVE_DEFAULTS)
    args = parser.parse_args(["disentangle", "--model", "vgg16", "--out", "x", "--selective", "--negative-weight", "7"])
    assert common.config_from_args(args) == NADConfig(**{**SELECTIVE_DEFAULTS, "negative_weight": 7.0})
    assert common.GATE_TEMPERATURE == NADConfig.gate_temperature
    args = parser.parse_args(["disentangle", "--model", "vgg16", "--out", "x", "--selective", "--gate", "soft"])
    assert common.config_from_args(args) == NADConfig(**{**SELECTIVE_DEFAULTS, "gate": "soft"})
    args = parser.parse_args(["disentangle", "--model", "vgg16", "--out", "x", "--gate", "annealed",
                              "--gate-temperature", "0.05"])
    assert common.config_from_args(args) == NADConfig(gate="annealed", gate_temperature=0.05)
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
