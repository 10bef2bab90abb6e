"""Weights files: reading a state dict without unpickling code (torch.save'd files or
safetensors, checked against their checksums), loading it into a registry model with a readable
error when it does not fit, and writing one with checksums (:func:`save_weights`)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from nad_ext._utils.storage import CorruptFileError, load_safetensors, save_safetensors
from nad_ext.models.registry import get_spec


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a safetensors file, or a torch.save'd state dict (also
    inside a checkpoint dict under "state_dict" or "model"), loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    invalid = f"weights file {path} is not a valid state dict"
    kind = "safetensors file" if path.suffix == ".safetensors" else "file written by torch.save"
    # PyTorch's message for a refused pickle advises weights_only=False, i.e. running the file's
    # code: it is not passed on (``from None``); weights files are only ever read as tensors.
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(path, "weights file")[0]  # checked against its checksums, if any
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CorruptFileError as err:  # a safetensors file whose checksums do not match: say which tensor
        raise ValueError(f"{invalid}: {err}") from None
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise ValueError(f"{invalid}: it holds Python objects, not only tensors (a whole pickled model?); "
                             "save model.state_dict() instead") from None
        raise ValueError(f"{invalid}: the file is damaged or not a {kind}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{invalid}: it holds something other than a dict of tensors")
    # DataParallel checkpoints prefix every key with "module."; DARTS's carry an auxiliary head.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """ValueError listing the missing, unexpected and mismatched keys unless ``state`` fits ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    # One line (the command line reports it as one ``error:`` line), its parts separated by "; ".
    shared = len(state) - len(unexpected)
    head = f"weights file {path} does not fit model {name!r}"
    if not shared or shared < len(expected) // 2:
        head += (f" (it looks like weights of another architecture: {shared} of its {len(state)} keys are among "
                 f"the model's {len(expected)})")
    parts = [head]
    show = lambda keys: ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")  # noqa: E731
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if mismatched:
        shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})" for k in mismatched]
        parts.append(f"shape mismatches: {show(shapes)}")
        classifier = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
        if classifier and f"{classifier[0]}.weight" in mismatched:
            parts.append(f"the classifier {classifier[0]} has {state[classifier[0] + '.weight'].shape[0]} outputs in "
                         f"the file, {expected[classifier[0] + '.weight'].shape[0]} in the model: pass num_classes")
    raise ValueError("; ".join(parts))


def load_model(name: str, weights: str | Path | None = None, num_classes: int = 1000) -> nn.Module:
    """Builds registry model ``name``, loads ``weights`` if given, and returns it frozen: in
    eval mode, ``requires_grad`` False on every parameter.

    ``weights``: a state dict saved with ``torch.save`` (.pt/.pth, or a checkpoint dict with a
    "state_dict"/"model" entry) or a .safetensors file. A missing file raises FileNotFoundError;
    a file for another architecture (or another ``num_classes``) raises ValueError listing the
    missing, unexpected and mismatched keys.
    """
    spec = get_spec(name)
    model = spec.build(num_classes)
    if weights is not None:
        state = read_state_dict(weights)
        check_compatible(model, state, name, Path(weights))
        model.load_state_dict(state)
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with ``requires_grad`` False on every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model



def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str]) -> None:
    """Writes ``model``'s state dict atomically as safetensors, with ``metadata`` and a checksum
    per tensor (the zoo cache's files)."""
    save_safetensors({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, path, metadata)
