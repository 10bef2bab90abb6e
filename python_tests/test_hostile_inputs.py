"""Hostile inputs at the command line: every row is a command given something wrong (a damaged
or foreign file, a folder where a file belongs, a symbolic link, ...), answered with one
``error:`` line that says what was expected, exit status 2, no traceback, and nothing written,
changed or lost: the files the command was given and the folders it would write are compared,
byte for byte, before and after.

The inputs are made from small generated data and models (no downloads). The lock file of a run
folder (``.nad.lock``) is compared by presence only: opening a folder records its opener there,
and it holds no run data.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from nad_ext import cli, models
from nad_ext._utils.storage import CorruptFileError, save_safetensors
from nad_ext.gates import MaskBank
from test_cli import tree  # noqa: F401 - the same small ImageFolder tree (a module-scoped fixture)

LOCK = ".nad.lock"


# ----------------------------------------------------------------------------------------------
# inputs shared by the rows (made once) and the state of a folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weights files: zoo_plain (.pt), zoo_residual and zoo_vit (.safetensors), a pickled model."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(models.get_spec("zoo_plain").build(4).state_dict(), folder / "plain.pt")
    torch.save(models.get_spec("zoo_plain").build(4), folder / "pickled_model.pt")
    for name in ("zoo_residual", "zoo_vit"):
        state = {k: v.contiguous() for k, v in models.get_spec(name).build(4).state_dict().items()}
        save_file(state, str(folder / f"{name}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def committed_run(tree, weights, tmp_path_factory):
    """A run folder of zoo_plain, one epoch committed."""
    out = tmp_path_factory.mktemp("committed") / "run"
    code = cli.main([str(a) for a in ["disentangle", *base_args(tree, weights, out)]])
    assert code == 0
    return out


def base_args(tree, weights, out):
    return ["--model", "zoo_plain", "--weights", weights / "plain.pt", "--data", tree, "--out", out,
            "--image-size", 32, "--beta", 1.0, "--epochs", 1]


def state_of(*roots) -> dict:
    """Every entry under ``roots``, links not followed: files by content, links by target."""
    state = {}
    for root in roots:
        if not os.path.lexists(root):
            continue
        state[str(root)] = ("link", os.readlink(root)) if os.path.islink(root) else "root"
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    state[path] = ("link", os.readlink(path))
                elif os.path.isdir(path):
                    state[path] = "dir"
                elif name == LOCK:
                    state[path] = "lock"
                else:
                    with open(path, "rb") as f:
                        state[path] = f.read()
    return state


# ----------------------------------------------------------------------------------------------
# how the rows make their hostile inputs


class Inputs:
    """What a row builds on: the shared inputs and this row's own folder (``tmp``)."""

    def __init__(self, tree, weights, committed_run, tmp):
        self.tree, self.weights, self.tmp, self._committed = tree, weights, tmp, committed_run
        self.classes = sorted(p.name for p in (tree / "train").iterdir())

    def disentangle(self, *extra, out=None, model_weights=None):
        argv = ["disentangle", *base_args(self.tree, self.weights, out or self.tmp / "out"), *extra]
        if model_weights is not None:
            argv[argv.index("--weights") + 1] = model_weights
        return argv

    def analyze(self, bank, *extra):
        return ["analyze", "--model", "zoo_plain", "--weights", self.weights / "plain.pt", "--data", self.tree,
                "--bank", bank, "--out", self.tmp / "analysis", "--image-size", 32, "--mosaics", 2, *extra]

    def tasks(self, text: str | bytes):
        path = self.tmp / "tasks.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return self.disentangle("--tasks", path)

    def run_copy(self):
        """A copy of the committed run folder, to damage."""
        run = self.tmp / "run"
        shutil.copytree(self._committed, run, symlinks=True)
        return run

    def bank(self, name="bank.safetensors", tensors=None, meta=None, folder=None):
        """The committed bank rewritten with ``tensors(dict)`` / ``meta(dict)`` applied (and fresh,
        valid checksums: only the reader's checks of the contents can refuse it)."""
        with safe_open(str(self._committed / "masks.safetensors"), framework="pt") as f:
            t, m = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        m.pop("crc32")
        if tensors:
            tensors(t)
        if meta:
            meta(m)
        path = (folder or self.tmp) / name
        save_safetensors(t, path, m)
        return path

    def data_copy(self):
        copy = self.tmp / "data"
        shutil.copytree(self.tree, copy)
        return copy


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _poke(value, index=0):
    def poke(t):
        t[f"logits.{index:03d}"][1, 2] = value
    return poke


def _narrow(t):  # gate point 0 loses its last channel, in the tensor and (see the meta) the channels list
    t["logits.000"] = t["logits.000"][:, :-1].contiguous()


def _one_fewer_channel(m):
    channels = json.loads(m["channels"])
    m["channels"] = json.dumps([channels[0] - 1] + channels[1:])


def _empty_class_folder(i: Inputs):
    root = i.data_copy()
    for p in (root / "train" / i.classes[1]).iterdir():
        p.unlink()
    return i.disentangle("--data", root)


def _val_with_other_classes(i: Inputs):
    root = i.data_copy()
    (root / "val" / i.classes[3]).rename(root / "val" / "zebra")
    return i.disentangle("--data", root)


def _truncated_bank(i: Inputs):
    run = i.run_copy()
    raw = (run / "masks.safetensors").read_bytes()
    (run / "masks.safetensors").write_bytes(raw[: len(raw) // 2])
    return i.disentangle("--resume", "--epochs", 2, out=run)


def _truncated_log(i: Inputs):
    run = i.run_copy()
    raw = (run / "log.json").read_bytes()
    (run / "log.json").write_bytes(raw[: len(raw) // 2])
    return i.disentangle("--resume", "--epochs", 2, out=run)


def _copies_without_bank(i: Inputs):
    run = i.run_copy()
    shutil.copy(run / "masks_epoch01.safetensors", run / "masks_epoch02.safetensors")
    (run / "masks.safetensors").unlink()
    return i.disentangle("--resume", "--epochs", 3, out=run)


def _lock_links_outside(i: Inputs):
    run = i.run_copy()
    outside = i.tmp / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("someone else's file\n")
    (run / LOCK).unlink()
    (run / LOCK).symlink_to(outside / "notes.txt")
    return i.disentangle("--resume", "--epochs", 2, out=run)


def _nan_bank_in_run(i: Inputs):
    run = i.run_copy()
    i.bank("masks.safetensors", tensors=_poke(float("nan")), folder=run)
    return i.disentangle("--resume", "--epochs", 2, out=run)


def _resume_a_bank_of_other_shapes(i: Inputs):
    run = i.run_copy()
    i.bank("masks.safetensors", tensors=_narrow, meta=_one_fewer_channel, folder=run)
    return i.disentangle("--resume", "--epochs", 2, out=run)


def _no_val_split(i: Inputs):
    root = i.data_copy()
    shutil.rmtree(root / "val")
    return i.disentangle("--data", root)


def _prepare_data_out_is_a_file(i: Inputs):
    (i.tmp / "cache").write_text("not a folder\n")
    return ["prepare-data", "--data", i.tree, "--out", i.tmp / "cache", "--image-size", 32]


def _calibrate_out_is_a_folder(i: Inputs):
    (i.tmp / "cal.json").mkdir()
    return ["calibrate", "--model", "zoo_plain", "--weights", i.weights / "plain.pt", "--data", i.tree,
            "--image-size", 32, "--num-tasks", 2, "--epochs", 1, "--runs", 2, "--out", i.tmp / "cal.json"]


def _out_is_a_file(i: Inputs):
    (i.tmp / "out").write_text("not a folder\n")
    return i.disentangle()


def _out_dangling_link(i: Inputs):
    (i.tmp / "out").symlink_to(i.tmp / "nowhere")
    return i.disentangle()


def _tuple_gate_point(i: Inputs):
    argv = i.disentangle("--gate-points", "encoder.layers.encoder_layer_0.self_attention",
                         out=i.tmp / "new" / "out", model_weights=i.weights / "zoo_vit.safetensors")
    argv[argv.index("--model") + 1] = "zoo_vit"
    argv[argv.index("--image-size") + 1] = 64
    return argv


def _analysis_out_is_a_file(i: Inputs):
    (i.tmp / "analysis").write_text("not a folder\n")
    return i.analyze(i.bank())


def _similarity_out_is_a_folder(i: Inputs):
    (i.tmp / "sim.csv").mkdir()
    return ["similarity", "--bank", i.bank(), "--out", i.tmp / "sim.csv"]


def _c(i: Inputs, n: int) -> str:
    return json.dumps(i.classes[n])


# (id, how the row makes its command from Inputs, the fragment its error line must hold)
ROWS = [
    # --tasks
    ("tasks: an unknown class", lambda i: i.tasks('{"a": ["no-such-class"]}'), "unknown classes ['no-such-class']"),
    ("tasks: a list, not an object", lambda i: i.tasks(f'[[{_c(i, 0)}]]'),
     "must hold a non-empty JSON object {task: [class, ...]}"),
    ("tasks: an empty object", lambda i: i.tasks("{}"), "(--tasks); got an empty object"),
    ("tasks: a number", lambda i: i.tasks("3"), "(--tasks); got a number"),
    ("tasks: a task without classes", lambda i: i.tasks('{"a": []}'), "has no classes; give it at least one of"),
    ("tasks: a task name that is not a string", lambda i: i.tasks(f'{{1: [{_c(i, 0)}]}}'),
     "is not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ("tasks: classes as a string", lambda i: i.tasks(f'{{"a": {_c(i, 0)}}}'),
     "expected a list of class names (strings), got a string"),
    ("tasks: a class that is not a string", lambda i: i.tasks('{"a": [3]}'),
     "expected a list of class names (strings), got an array holding a number"),
    ("tasks: null classes", lambda i: i.tasks('{"a": null}'), "expected a list of class names (strings), got null"),
    ("tasks: a task named twice", lambda i: i.tasks(f'{{"a": [{_c(i, 0)}], "a": [{_c(i, 1)}]}}'),
     "task 'a' appears more than once; task names must be unique"),
    ("tasks: an empty task name", lambda i: i.tasks(f'{{" ": [{_c(i, 0)}]}}'), "a task has an empty name"),
    ("tasks: a class listed twice", lambda i: i.tasks(f'{{"a": [{_c(i, 0)}, {_c(i, 0)}]}}'), "more than once"),
    ("tasks: not a text file", lambda i: i.tasks(b"\xff\xfe\x00binary"), "is not a text file"),
    ("tasks: a folder", lambda i: i.disentangle("--tasks", i.tmp), "): Is a directory"),
    # --out
    ("out: a file", _out_is_a_file, "is a file; expected a folder for the run"),
    ("out: a dangling symbolic link", _out_dangling_link, "which does not exist; expected a folder (a link to an "
                                                           "existing folder is followed)"),
    ("calibrate --out: a folder", _calibrate_out_is_a_folder, "is a folder; expected the JSON file to write"),
    ("analyze --out: a file", _analysis_out_is_a_file, "is a file; expected a folder for the analyses"),
    ("similarity --out: a folder", _similarity_out_is_a_folder, "is a folder; expected the CSV file to write"),
    ("prepare-data --out: a file", _prepare_data_out_is_a_file, "exists and is not a data cache: choose another --out"),
    ("report: a folder without results", lambda i: ["report", i.tmp, "--out", i.tmp / "report.html"],
     "results.json does not exist: run `nad analyze"),
    # --gate-points
    ("gate point: no such module", lambda i: i.disentangle("--gate-points", "features.99", out=i.tmp / "a" / "b"),
     "gate point 'features.99' is not a module"),
    ("gate point: a module that outputs a tuple", _tuple_gate_point,
     "must output a tensor (N, C, ...); got tuple (an attention module: gate its heads with"),
    # --weights
    ("weights: another architecture", lambda i: i.disentangle(model_weights=i.weights / "zoo_residual.safetensors"),
     "does not fit model 'zoo_plain' (it looks like weights of another architecture"),
    ("weights: a pickled model", lambda i: i.disentangle(model_weights=i.weights / "pickled_model.pt"),
     "it holds Python objects, not only tensors"),
    ("weights: not a weights file",
     lambda i: i.disentangle(model_weights=next((i.tree / "val" / i.classes[0]).iterdir())),
     "is not a valid state dict: the file is damaged"),
    # --data
    ("data: an empty class folder", _empty_class_folder, "has no image files"),
    ("data: no val/ split", _no_val_split, "split folder not found"),
    ("data: val/ with other classes", _val_with_other_classes,
     "train/ and val/ must have the same class folders (only in train/:"),
    # --bank
    ("bank: of another model", lambda i: ["analyze", "--model", "zoo_residual", "--weights",
                                          i.weights / "zoo_residual.safetensors", "--data", i.tree, "--bank", i.bank(),
                                          "--out", i.tmp / "analysis"],
     "mask bank does not match the model"),
    ("bank: a run folder", lambda i: ["similarity", "--bank", i.run_copy()],
     "is a folder; expected a mask bank file (such as "),
    ("bank: not a bank", lambda i: ["similarity", "--bank", i.weights / "plain.pt"],
     "is corrupted or not a safetensors file"),
    ("bank: another safetensors file", lambda i: ["similarity", "--bank", i.weights / "zoo_vit.safetensors"],
     "is not a nad-ext mask bank"),
    ("bank: wrong shapes for the model", lambda i: i.analyze(i.bank(tensors=_narrow, meta=_one_fewer_channel)),
     "does not fit --model zoo_plain: gate point 'features.3' has 16 channels on axis 1 in this network, "
     "but 15 were expected"),
    ("bank: a tensor of another shape than its metadata", lambda i: ["similarity", "--bank", i.bank(tensors=_narrow)],
     "must have shape (4, 16); got (4, 15)"),
    ("bank: a NaN logit", lambda i: ["similarity", "--bank", i.bank(tensors=_poke(float("nan")))],
     "holds 1 NaN and 0 infinite values (the first at (1, 2)); gate logits must be finite"),
    ("bank: an infinite logit", lambda i: i.analyze(i.bank(tensors=_poke(float("-inf"), 3))),
     "tensor 'logits.003' (gate point 'features.14') holds 0 NaN and 1 infinite values"),
    ("bank: float64 logits", lambda i: ["similarity", "--bank", i.bank(tensors=lambda t: t.update(
        {"logits.001": t["logits.001"].double()}))], "is float64; gate logits must be float32"),
    ("bank: task names that are not strings",
     lambda i: ["similarity", "--bank", i.bank(meta=_set("tasks", "[1, 2, 3, 4]"))],
     "'tasks' (the task names) must be a JSON list of non-empty strings, got [1, 2, 3, 4]"),
    ("bank: negative class indices", lambda i: ["similarity", "--bank", i.bank(
        meta=_set("task_classes", "[[0], [1], [-2], [3]]"))], "'task_classes' of task"),
    ("bank: classes the data does not have", lambda i: i.analyze(i.bank(
        meta=_set("task_classes", "[[0], [1], [2], [9]]"))), "its tasks use class index 9, the data has 4 classes"),
    # the run folder (--out with --resume)
    ("run folder: a truncated bank", _truncated_bank, "cannot resume: mask bank"),
    ("run folder: a truncated log", _truncated_log, "log.json is damaged"),
    ("run folder: epoch copies but no bank", _copies_without_bank,
     "has no mask bank (masks.safetensors) but epoch copies up to masks_epoch02.safetensors"),
    ("run folder: a lock file linking outside", _lock_links_outside, ".nad.lock is a symbolic link"),
    ("run folder: a NaN in the bank", _nan_bank_in_run, "cannot resume: mask bank"),
    ("run folder: --overwrite with a gate point that is no module", lambda i: i.disentangle(
        "--overwrite", "--gate-points", "features.99", out=i.run_copy()), "gate point 'features.99' is not a module"),
    ("run folder: a bank of other shapes", _resume_a_bank_of_other_shapes,
     "mask bank does not match the model: gate point 'features.3' has 15 channels in the bank but 16 in the model"),
]


@pytest.mark.parametrize("make, fragment", [pytest.param(make, fragment, id=name) for name, make, fragment in ROWS])
def test_hostile_input_gets_one_line_exit_2_and_changes_nothing(tree, weights, committed_run, tmp_path, capsys,
                                                                 make, fragment):
    inputs = Inputs(tree, weights, committed_run, tmp_path)
    argv = [str(a) for a in make(inputs)]
    capsys.readouterr()
    before = state_of(tmp_path, tree, weights, committed_run)
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err and all(line.startswith(("error:", "note:")) or "|" in line or "%" in line
                                          for line in err.splitlines()), err
    assert state_of(tmp_path, tree, weights, committed_run) == before


# ----------------------------------------------------------------------------------------------
# symbolic links that are followed, and those that are not


def test_a_symlinked_run_folder_is_followed(tree, weights, tmp_path, capsys):
    """--out may be a link to a folder: the run is written into that folder."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    assert cli.main([str(a) for a in ["disentangle", *base_args(tree, weights, tmp_path / "link")]]) == 0
    assert (tmp_path / "link").is_symlink() and MaskBank.load(real / "masks.safetensors").epoch == 1


def test_links_inside_the_run_folder_are_replaced_not_written_through(tree, weights, committed_run, tmp_path, capsys):
    """Files of the run that are links to files outside it are replaced by the run's own files (atomic
    renames over the link) or removed (the link, not its target); nothing outside is written."""
    run = tmp_path / "run"
    shutil.copytree(committed_run, run, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name, text in (("log.json", "their log\n"), ("masks_epoch02.safetensors", "their file\n"),
                       ("masks_epoch03.safetensors", "their other file\n")):
        (outside / name).write_text(text)
    (run / "log.json").rename(outside / "log_of_the_run.json")
    (run / "log.json").symlink_to(outside / "log_of_the_run.json")  # readable: the log is read through it
    (run / "masks_epoch02.safetensors").symlink_to(outside / "masks_epoch02.safetensors")  # uncommitted
    (run / "shards").symlink_to(outside, target_is_directory=True)
    before = state_of(outside)
    argv = ["disentangle", *base_args(tree, weights, run), "--resume"]
    argv[argv.index("--epochs") + 1] = 2
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert state_of(outside) == before
    assert not any(p.is_symlink() for p in run.iterdir())
    assert MaskBank.load(run / "masks_epoch02.safetensors").epoch == 2
    assert len(json.loads((run / "log.json").read_text())["epochs"]) == 2


# ----------------------------------------------------------------------------------------------
# the same checks through the Python API


def test_mask_bank_load_refuses_non_finite_and_foreign_contents(tree, weights, committed_run, tmp_path):
    i = Inputs(tree, weights, committed_run, tmp_path)
    with pytest.raises(CorruptFileError, match=r"tensor 'logits.000' \(gate point 'features.3'\) holds 1 NaN"):
        MaskBank.load(i.bank("nan.safetensors", tensors=_poke(float("nan"))))
    with pytest.raises(CorruptFileError, match="'channel_axes' must be a JSON list of integers >= 1"):
        MaskBank.load(i.bank("axes.safetensors", meta=_set("channel_axes", '[0, 1, 1, 1, 1, 1]')))
    with pytest.raises(CorruptFileError, match="'task_classes' must be a JSON list of 4 lists"):
        MaskBank.load(i.bank("classes.safetensors", meta=_set("task_classes", '{"a": 1}')))
    assert MaskBank.load(i.bank("same.safetensors")).epoch == 1  # the rewriting itself keeps a bank valid


def test_tasks_that_a_bank_could_not_store_are_refused_when_made():
    from nad_ext.gates.maskbank import Task

    for name in (1, "", "  ", None):
        with pytest.raises(ValueError, match="a task name must be a non-empty string"):
            Task(name, (0,))
    for classes in ("ab", ["c0"], (0, -1), (True,), (0.5,)):
        with pytest.raises(ValueError, match="classes must be class indices"):
            Task("a", classes)
    assert Task("a", [0, torch.tensor(1).item()]).classes == (0, 1)  # any sequence of integers, stored as a tuple
