"""nad-ext: Neural Architecture Disentanglement for PyTorch CNNs.

The path through the package: data -> models -> gates -> objective -> maskbank -> trainer ->
analysis -> report; ``nad_ext.ops`` holds the native operators every stage may use.
"""
from nad_ext import _extension  # noqa: F401  (raises a clear error when the build is missing)
from nad_ext import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
