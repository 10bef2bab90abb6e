"""nad-ext: Neural Architecture Disentanglement for PyTorch CNNs.

The path through the package: data -> models -> gates -> objective -> maskbank -> trainer ->
analysis -> report; ``nad_ext.ops`` holds the native operators every stage may use (importing
it loads the compiled extension, with a clear error when the build is missing).

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
