"""Build of nad-ext's native extension (nad_ext._C) through torch.utils.cpp_extension.

NAD_EXT_BUILD selects the kind of build:
  auto (default)  CUDA kernels when this machine has an NVIDIA GPU, PyTorch is a CUDA build
                  and a CUDA toolkit is found; CPU kernels only otherwise (minutes instead of
                  a quarter of an hour on 2 cores);
  cuda            force the CUDA build, GPU or not (CI compiles the kernels that way; fails
                  if no toolkit is found);
  cpu             force the CPU-only build.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default here: 9.0, the H100).
`python setup.py --print-build-kind` prints what auto chooses and why (scripts/setup.sh).
"""
import glob
import os
import sys

from setuptools import setup

# torch finds the toolkit through `which nvcc`; where nvcc is a wrapper script in /usr/local/bin
# that guess (/usr/local) is wrong, so point at the usual toolkit folder first.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
    "/usr/local/cuda/bin/nvcc"
):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_library_headers() -> list:
    """Include folders of the CUDA libraries that PyTorch's headers need (cuSPARSE, cuBLAS...).

    A minimal toolkit may lack them; the nvidia-* wheels that come with a CUDA build of torch
    carry them, so use those when the toolkit does not have them.
    """
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME or "", "include", "cusparse.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    found = glob.glob(os.path.join(roots[0], "*", "include", "cusparse.h")) if roots else []
    return [os.path.dirname(path) for path in found[:1]]


def gpu_present() -> bool:
    """An NVIDIA GPU that PyTorch can use, or at least a device node of one (a driver too old
    for this PyTorch still has /dev/nvidia0)."""
    return torch.cuda.is_available() or bool(glob.glob("/dev/nvidia[0-9]*"))


def build_kind() -> tuple[bool, str]:
    """(build the CUDA kernels?, why), from NAD_EXT_BUILD and what this machine has."""
    mode = os.environ.get("NAD_EXT_BUILD", "auto").lower()
    if mode not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"NAD_EXT_BUILD must be auto, cuda or cpu, got {mode!r}")
    if mode == "cpu":
        return False, "NAD_EXT_BUILD=cpu"
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "cuda":
        if not possible:
            raise SystemExit(
                "NAD_EXT_BUILD=cuda but no CUDA build is possible: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        return True, "NAD_EXT_BUILD=cuda"
    if not gpu_present():
        return False, "no GPU on this machine (NAD_EXT_BUILD=cuda compiles the CUDA kernels anyway)"
    if not possible:
        return False, (f"a GPU but no CUDA toolkit or CUDA build of PyTorch (torch.version.cuda="
                       f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    return True, "a GPU, a CUDA build of PyTorch and a CUDA toolkit"


def want_cuda() -> bool:
    return build_kind()[0]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension compiling in a fixed folder, build/temp-<cpu|cuda>-<python>/:
    pip's editable installs give every build a new temporary folder, so each rerun of
    scripts/setup.sh (and scripts/test.sh) recompiled everything; here ninja recompiles only
    what changed (it also notices changed flags)."""

    def finalize_options(self):
        super().finalize_options()
        kind = "cuda" if any(isinstance(e.sources, list) and any(s.endswith(".cu") for s in e.sources)
                             for e in self.extensions) else "cpu"
        self.build_temp = os.path.join(ROOT, "build", f"temp-{kind}-{sys.implementation.cache_tag}")


def extension():
    cuda = want_cuda()
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if cuda:
        include_dirs += cuda_library_headers()
    cxx = ["-O3"]
    # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop.
    # The extension then uses the OpenMP runtime torch has already loaded (same soname).
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    kwargs = dict(
        name="nad_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=[("NAD_WITH_CUDA", "1")] if cuda else [],
        extra_compile_args={"cxx": cxx + openmp, "nvcc": ["-O3", "-lineinfo"]}
        if cuda
        else {"cxx": cxx + openmp},
        extra_link_args=openmp,
    )
    make = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    return make(**kwargs)


if __name__ == "__main__" and sys.argv[1:] == ["--print-build-kind"]:
    cuda, why = build_kind()
    print(f"{'cuda' if cuda else 'cpu'}: {why}")
    sys.exit(0)

# Package metadata lives in pyproject.toml; this file only describes the native extension.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
