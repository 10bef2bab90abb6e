"""nad-ext: Neural Architecture Disentanglement for PyTorch CNNs.

The path through the code, one subpackage per stage, each importing only the ones before it:

    data -> models -> gates -> training / analysis -> report / path_study -> demo -> cli

- :mod:`nad_ext.data`: image sets, the paper's transforms, the input pipelines, prepared caches;
- :mod:`nad_ext.models`: the model registry (presets of gate points, beta, input size), the
  paper's networks and today's backbones, the built-in zoo, weights files;
- :mod:`nad_ext.gates`: gate points, :class:`~nad_ext.gates.GatedModel` (task-conditional
  gates on any module), the fast path's rewrites, exports for C++, the mask bank, the path store;
- :mod:`nad_ext.training`: :class:`~nad_ext.training.NADConfig`, the objective, the training
  loop, beta calibration, :func:`~nad_ext.training.disentangle` and the run folder, per-image
  paths (:func:`~nad_ext.training.learn_paths`);
- :mod:`nad_ext.analysis`: the paper's analyses of a mask bank and the analyses of paths (beside
  training: each reads banks, neither imports the other);
- :mod:`nad_ext.report` (one HTML page), :mod:`nad_ext.path_study` (paths of a set and of an
  attacked copy against the class sub-architectures), :mod:`nad_ext.demo` (``nad demo``),
  :mod:`nad_ext.cli` (the ``nad`` command, ``python -m nad_ext``).

Beside the line: :mod:`nad_ext.ops` (the native operators ``torch.ops.nad.*``; the gates and
later stages use them; importing it loads the compiled extension, with a clear error when the
build is missing), :mod:`nad_ext.distributed` (this process's place in a torchrun world) and
``nad_ext._utils`` (atomic files, checksummed safetensors, fault injection, progress bars),
which every stage may use. docs/DESIGN.md has the map; python_tests/test_layout.py enforces it.

Importing the package itself loads neither torch nor the extension, so that ``nad --help``
and argument errors answer at once; ``nad_ext.ops`` and the other modules load on first use.
"""
__version__ = "0.1.0"
__all__ = ["ops", "__version__"]


def __getattr__(name):
    if name == "ops":
        import importlib

        return importlib.import_module("nad_ext.ops")
    raise AttributeError(f"module 'nad_ext' has no attribute {name!r}")
