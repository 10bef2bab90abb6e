"""The paper's analyses of a mask bank (METHOD.md, "Analyses in the paper"), with error bars.

Every analysis takes a :class:`~nad_ext.gates.maskbank.MaskBank` (and, where it runs images, the
:class:`~nad_ext.gates.model.GatedModel` it belongs to plus a validation :class:`ImageSet`) and
returns plain Python / NumPy results. :func:`run_all` runs them all and writes the results to
a folder (``results.json``, the similarity matrices as CSV, the hit-rate example arrays as
``.npz``); :mod:`nad_ext.report` turns them into one HTML page.

Sub-architectures are always the *binary* ones: channel c of gate point l is open for task t
when its logit is > 0, and the masked network multiplies closed channels by exactly 0.

The analyses that run the network take ``map_units(fn, n) -> [fn(0), ..., fn(n - 1)]``: the
units are the batches a single process runs, so a mapper that computes them on several
processes (``nad_ext.distributed.Context.map_units``, under torchrun) gives the same results.

Modules: :mod:`~nad_ext.analysis.masks` (the masks alone: open ratios, similarity, clustering),
:mod:`~nad_ext.analysis.accuracy` (what the sub-architectures predict, confusions against
similarity), :mod:`~nad_ext.analysis.maps` (activation maps, the single-image view),
:mod:`~nad_ext.analysis.hit_rate` (the mosaic hit rate), :mod:`~nad_ext.analysis.paths`
(per-image routing paths against the class sub-architectures, issue 26: path to class,
misclassified images, per-gate-point class specificity, the far-path detector with its FGSM /
PGD attacks), :mod:`~nad_ext.analysis.results` (everything at once, written and read back);
:mod:`~nad_ext.analysis.common` holds what they share.

May import: :mod:`nad_ext._utils`, :mod:`nad_ext.distributed`, :mod:`nad_ext.data`,
:mod:`nad_ext.models`, :mod:`nad_ext.gates`, :mod:`nad_ext.ops`. Not :mod:`nad_ext.training`:
the analyses read mask banks, whoever wrote them; a new analysis is one file here.
"""
from nad_ext.analysis.accuracy import confusion_vs_similarity, masked_accuracy
from nad_ext.analysis.common import (BALANCED_ACCURACY, FALSE_POSITIVES, MEASURES_MEANING, OPEN_CHANNELS,
                                     OWN_CLASS_ACCURACY)
from nad_ext.analysis.hit_rate import ALL_CONSTANT_NOTE, CHANCE_HIT, NON_SPATIAL_NOTE, hit_rate
from nad_ext.analysis.maps import activation_maps, position_map, single_image_view, top_hits
from nad_ext.analysis.masks import (cluster_order, layerwise_similarity, relative_depth, similarity,
                                    subarchitecture_stats)
from nad_ext.analysis.paths import (detector_auc, fgsm, layerwise_path_to_class, misclassified_paths,
                                    path_class_similarity, path_outlier_scores, path_to_class, pgd, roc_auc)
from nad_ext.analysis.results import load_results, run_all

__all__ = [
    "ALL_CONSTANT_NOTE", "BALANCED_ACCURACY", "CHANCE_HIT", "FALSE_POSITIVES", "MEASURES_MEANING", "NON_SPATIAL_NOTE",
    "OPEN_CHANNELS", "OWN_CLASS_ACCURACY", "activation_maps", "cluster_order", "confusion_vs_similarity",
    "detector_auc", "fgsm", "hit_rate", "layerwise_path_to_class", "layerwise_similarity", "load_results",
    "masked_accuracy", "misclassified_paths", "path_class_similarity", "path_outlier_scores", "path_to_class", "pgd",
    "position_map", "relative_depth", "roc_auc", "run_all", "similarity", "single_image_view",
    "subarchitecture_stats", "top_hits",
]
