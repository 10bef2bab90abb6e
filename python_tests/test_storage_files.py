"""Output files (nad_ext._utils.storage): written atomically, with the mode the user's umask gives (not mkstemp's 0600)."""
import os
import stat

import pytest
import torch

from nad_ext import models
from nad_ext._utils import storage
from nad_ext.models.weights import save_weights
from nad_ext.gates import GatePoint, MaskBank, Task


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert storage.current_umask() == mask
    storage.atomic_write(tmp_path / "out.txt", lambda tmp: open(tmp, "w").write("x"))
    assert mode(tmp_path / "out.txt") == expected
    # the same mode as a plain open() would give
    open(tmp_path / "plain.txt", "w").close()
    assert mode(tmp_path / "plain.txt") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "plain.txt"]


def test_mask_banks_and_the_zoo_cache_are_readable_by_the_group(tmp_path, umask):
    umask(0o022)
    bank = MaskBank("m", [GatePoint("a", 2)], [Task("t", (0,))], [torch.zeros(1, 2)])
    bank.save(tmp_path / "masks.safetensors")
    assert mode(tmp_path / "masks.safetensors") == 0o644
    save_weights(models.get_spec("zoo_plain").build(3), tmp_path / "zoo_plain.safetensors", {"k": "v"})
    assert mode(tmp_path / "zoo_plain.safetensors") == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "f").write_text("old")

    def broken(tmp):
        open(tmp, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.atomic_write(tmp_path / "f", broken)
    assert (tmp_path / "f").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]
