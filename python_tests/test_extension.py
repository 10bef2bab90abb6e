"""nad_ext._extension: which library registered the operators, its CUDA kernels, the errors of
a build without them, and the opt-in host check of CUDA task ids (csrc/ops/task_ids.h)."""
import os
import subprocess
import sys

import pytest
import torch

import nad_ext
from nad_ext import _extension

CUDA = torch.cuda.is_available()


def test_library_info_names_the_library_that_registered_the_operators():
    info = _extension.library_info()
    assert info["version"] == nad_ext.__version__
    assert info["torch"] == torch.__version__.split("+")[0]
    expected = os.environ.get("NAD_EXT_LIBRARY") or _extension._C.__file__
    assert os.path.realpath(info["path"]) == os.path.realpath(expected)
    assert _extension.has_cuda_kernels() == info["cuda"]


def _all_ops(device="cpu"):
    """(name, op, args) of every public operator, with small valid arguments."""
    x = torch.randn(3, 4, 5, 5, device=device)
    w = torch.randn(4, 4, 3, 3, device=device)
    logits = torch.randn(2, 4, device=device)
    ids = torch.tensor([0, 1, 0], device=device)
    counts = torch.ones(3, dtype=torch.bool, device=device)
    conv = ([1, 1], [1, 1], [1, 1], 1, True)
    masks = torch.rand(2, 9, device=device) > 0.5
    ops = torch.ops.nad
    return [
        ("task_gate", ops.task_gate, (x, logits, ids)),
        ("task_gate_backward", ops.task_gate_backward, (x, x, logits, ids)),
        ("mask_overlap", ops.mask_overlap, (masks, masks, [4, 5], "iou", False)),
        ("masked_conv2d", ops.masked_conv2d, (x, w, None, logits, ids, *conv)),
        ("masked_conv2d_forward", ops.masked_conv2d_forward, (x, w, None, logits, ids, *conv)),
        ("masked_conv2d_backward", ops.masked_conv2d_backward, (x, x, w, x, logits, ids, *conv, True)),
        ("gate_mse", ops.gate_mse, (x, x, counts, ids, 2)),
        ("gate_mse_backward", ops.gate_mse_backward, (torch.ones(2, device=device), x, x, counts, ids, 2)),
        ("normalized_gradient_step_", ops.normalized_gradient_step_, ([logits.clone()], [logits], ids, 0.1)),
    ]


CPU_ONLY_ELSEWHERE = ("this build has CUDA kernels (CI builds them for sm_90); a CPU-only build's errors are checked by "
                      "the CPU-only sanitizer build's ctest (library_info_and_cuda_errors), and here under NAD_EXT_BUILD=cpu")


@pytest.mark.skipif(_extension.has_cuda_kernels(), reason=CPU_ONLY_ELSEWHERE)
@pytest.mark.parametrize("name", [name for name, _, _ in _all_ops()])
def test_cpu_only_build_refuses_the_cuda_backend_with_a_hint(name):
    """Every operator's CUDA kernel in a build without CUDA kernels says so (reached with CPU
    tensors through the CUDA dispatch key: no GPU needed), instead of "Could not run"."""
    _, op, args = next(entry for entry in _all_ops() if entry[0] == name)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=rf"nad::{name}: .*built without CUDA kernels .*NAD_EXT_BUILD=cuda"):
        op.default.redispatch(keys, *args)


def test_host_check_of_cuda_task_ids_is_opt_in():
    check = torch.ops.nad._check_task_ids
    assert check() is False  # off unless NAD_CHECK_TASK_IDS is set
    assert check(True) is False and check() is True
    assert check(False) is True and check() is False
    code = "import torch, nad_ext.ops; print(torch.ops.nad._check_task_ids())"
    for value, expected in (("1", "True"), ("0", "False"), ("", "False")):
        env = dict(os.environ, NAD_CHECK_TASK_IDS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr[-2000:])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_bad_cuda_task_ids_are_refused_on_the_host_when_checked():
    """With the check on, every operator with task ids refuses CUDA ids outside [0, T) before its
    kernels run, naming the operator (no device-side assert: the context stays usable)."""
    torch.ops.nad._check_task_ids(True)
    try:
        for name, op, args in _all_ops("cuda"):
            names = [a.name for a in op.default._schema.arguments]
            if "task_ids" not in names and "tasks" not in names:
                continue
            index = names.index("task_ids" if "task_ids" in names else "tasks")
            bad = list(args)
            bad[index] = bad[index] + 5
            with pytest.raises(RuntimeError, match=rf"{name.replace('_backward', '').replace('_forward', '')}.*must lie in \[0, 2\).*checked on the host"):
                op(*bad)
        _, op, args = _all_ops("cuda")[0]
        assert op(*args).shape == (3, 4, 5, 5)
        torch.cuda.synchronize()
    finally:
        torch.ops.nad._check_task_ids(False)
