"""One registration of the `nad` operators per process (csrc/ops/registration.h): libnad (CMake)
and nad_ext._C (setup.py) loaded into one process, in every order and visibility, must neither
abort nor warn; the first to load registers the operators (nad_ext._extension.library_info() names
it), the other registers nothing, and the operators give the same results whichever registered.

    python cpp_tests/check_registration.py <libnad.so>   (ctest: one_registration_per_process)

Each order runs in a fresh interpreter:
  extension_first  import nad_ext (nad_ext._C), then torch.ops.load_library(libnad)
  library_first    torch.ops.load_library(libnad), then import nad_ext (nad_ext._C)
  as_cpp_program   libnad loaded RTLD_GLOBAL first, as a C++ program linking libnad sees it when
                   it embeds Python: its exported symbols then precede nad_ext._C's
  global_extension nad_ext._C loaded RTLD_GLOBAL first, then libnad
Exits 77 (skipped) when nad_ext._C is not built.
"""
import hashlib
import importlib.util
import os
import subprocess
import sys

CHILD = r'''
import ctypes, hashlib, os, sys
order, library = sys.argv[1], sys.argv[2]
if order == "as_cpp_program":
    ctypes.CDLL(library, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
import torch
if order == "library_first":
    torch.ops.load_library(library)
if order == "global_extension":
    sys.setdlopenflags(os.RTLD_GLOBAL | os.RTLD_NOW)
from nad_ext import _extension, ops
if order in ("extension_first", "global_extension"):
    torch.ops.load_library(library)
info = _extension.library_info()
gen = torch.Generator().manual_seed(0)
x = torch.randn(4, 3, 5, 5, generator=gen, requires_grad=True)
w = torch.randn(6, 3, 3, 3, generator=gen)
logits = torch.randn(2, 6, generator=gen, requires_grad=True)
ids = torch.tensor([0, 1, 1, 0])
y = ops.masked_conv2d(x, w, None, logits, ids, relu=True)
z = ops.task_gate(y, logits, ids)
loss = ops.gate_mse(z, y.detach(), torch.ones(4, dtype=torch.bool), ids, 2).sum()
gx, gl = torch.autograd.grad(loss, (x, logits))
masks = torch.randn(3, 10, generator=gen) > 0
sim = ops.mask_overlap(masks, masks, [4, 6], "iou")
digest = hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in (y, z, loss, gx, gl, sim))).hexdigest()
print(f"registered_by={info['path']}")
print(f"cuda={info['cuda']}")
print(f"digest={digest}")
'''


def run(order: str, library: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, order, library], capture_output=True, text=True, timeout=300)
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}")
    for marker in ("Warning", "terminate called", "Only a single TORCH_LIBRARY", "Overriding a previously registered"):
        if marker in proc.stderr:
            problems.append(f"stderr has {marker!r}")
    if problems:
        raise SystemExit(f"{order}: " + "; ".join(problems) + f"\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return out


def main(library: str) -> None:
    library = os.path.realpath(library)
    spec = importlib.util.find_spec("nad_ext._C")
    if spec is None:
        print("skipped: nad_ext._C is not built (scripts/setup.sh builds it)")
        raise SystemExit(77)
    extension = os.path.realpath(spec.origin)
    expected_owner = {"extension_first": extension, "global_extension": extension,
                      "library_first": library, "as_cpp_program": library}
    results = {}
    for order, owner in expected_owner.items():
        out = run(order, library)
        results[order] = out
        assert os.path.realpath(out["registered_by"]) == owner, (
            f"{order}: the operators were registered by {out['registered_by']}, expected {owner}")
        print(f"{order}: registered by {os.path.basename(out['registered_by'])} (CUDA kernels {out['cuda']}), "
              f"results {out['digest'][:16]}")
    digests = {out["digest"] for out in results.values()}
    assert len(digests) == 1, f"the operators' results differ with the registering library: {results}"
    print("one registration per process, in every order; the same results from both libraries' kernels")


if __name__ == "__main__":
    main(sys.argv[1])
