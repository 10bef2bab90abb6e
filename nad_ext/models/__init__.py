"""The networks: a registry of model presets, the paper's networks and today's backbones, the
built-in zoo, and weights files.

- :mod:`~nad_ext.models.registry`: :class:`ModelSpec` (how to build a network, its gate-point
  presets per unit kind, the paper's beta or None, input size and normalisation),
  :func:`register`, :func:`get_spec`, :func:`list_models`;
- one family file per kind of network, each registering its presets when imported:
  :mod:`~nad_ext.models.vgg` (``vgg16``, ``zoo_plain``), :mod:`~nad_ext.models.resnet`
  (``resnet50``, ``zoo_residual``), :mod:`~nad_ext.models.densenet` (``densenet121``,
  ``zoo_dense``), :mod:`~nad_ext.models.darts` (``darts``, ``zoo_nas``),
  :mod:`~nad_ext.models.vision_transformer` (``vit_b_16``, ``zoo_vit``),
  :mod:`~nad_ext.models.swin_transformer` (``swin_t``), :mod:`~nad_ext.models.convnext`
  (``convnext_tiny``);
- :mod:`~nad_ext.models.weights`: weights files (state dicts, safetensors) and
  :func:`load_model`;
- :mod:`~nad_ext.models.zoo`: the zoo's training and cache (:func:`load_zoo`).

May import: :mod:`nad_ext._utils`, :mod:`nad_ext.distributed`, :mod:`nad_ext.data`. Nothing here
knows about gates: a preset names modules, the gates resolve them.
"""
# The family files register their networks on import, in this order (list_models()'s).
from nad_ext.models import vgg, resnet, densenet, darts  # noqa: F401,I001
from nad_ext.models import vision_transformer, swin_transformer, convnext  # noqa: F401,I001
from nad_ext.models.registry import MODELS, ModelSpec, get_spec, list_models, register
from nad_ext.models.weights import load_model, read_state_dict
from nad_ext.models.zoo import ZOO, ZOO_EPOCHS, evaluate, load_zoo, train_zoo_model

__all__ = [
    "MODELS", "ModelSpec", "ZOO", "ZOO_EPOCHS", "evaluate", "get_spec", "list_models", "load_model", "load_zoo",
    "read_state_dict", "register", "train_zoo_model",
]
