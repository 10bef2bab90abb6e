"""C++ writes, Python reads: every bank the C++ case maskbank_python_written wrote back
(<name>.cpp.safetensors) must load with nad_ext's MaskBank, checksums verified and no warning,
and equal, field by field, the bank Python wrote (<name>.safetensors); cpp_built.safetensors, made
from scratch in C++, must hold what the C++ case put in it.

    python cpp_tests/check_banks.py <fixtures folder>     (ctest: maskbank_cpp_written_read_by_python)
"""
import json
import sys
import warnings
from pathlib import Path

import torch


def main(folder: Path) -> None:
    from nad_ext.gates.maskbank import MaskBank, Task
    from nad_ext.gates.points import GatePoint

    warnings.simplefilter("error")  # a bank without (or with wrong) checksums warns: fail
    names = list(json.loads((folder / "banks_expected.json").read_text()))
    for name in names:
        python, cpp = MaskBank.load(folder / f"{name}.safetensors"), MaskBank.load(folder / f"{name}.cpp.safetensors")
        for field in ("model_id", "gate_points", "tasks", "config", "epoch", "calibration", "fidelity"):
            assert getattr(cpp, field) == getattr(python, field), (
                f"{name}: {field} differs: C++ wrote {getattr(cpp, field)!r}, Python {getattr(python, field)!r}")
        assert len(cpp.logits) == len(python.logits)
        for i, (a, b) in enumerate(zip(cpp.logits, python.logits)):
            assert a.dtype == torch.float32 and torch.equal(a, b), f"{name}: logits of gate point {i} differ"
        print(f"{name}: C++ copy equals Python's ({len(cpp.gate_points)} gate points, {len(cpp.tasks)} tasks)")

    built = MaskBank.load(folder / "cpp_built.safetensors")
    heads = {"record": "relu"} if "record" in GatePoint.__dataclass_fields__ else {}
    expected = {
        "model_id": "cpp_built",
        "gate_points": [GatePoint("blocks.0", 3, 2, "channels"), GatePoint("blocks.1.attn", 2, 2, "heads", **heads)],
        "tasks": [Task("\u00e9t\u00e9 \u20ac", (0, 4)), Task("plain", (1,))],
        "config": {"beta": 2.5, "epochs": 4},
        "epoch": 4,
        "calibration": {"beta": 2.5, "converged": False},
    }
    for field, value in expected.items():
        assert getattr(built, field) == value, f"cpp_built: {field} is {getattr(built, field)!r}, expected {value!r}"
    assert torch.equal(built.logits[0], torch.arange(6.0).reshape(2, 3) - 2)
    assert torch.equal(built.logits[1], torch.tensor([[1.5, -1.0], [-0.5, 2.0]]))
    print("cpp_built: as the C++ case made it")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
