"""Training: learning every task's gates on a frozen network, into a run folder.

- :mod:`~nad_ext.training.config`: :class:`NADConfig` (the paper's defaults) and the run's tasks;
- :mod:`~nad_ext.training.build`: :class:`Network` (what is gated) and
  :func:`build_gated_model`, the one place where the model registry meets the gates;
- :mod:`~nad_ext.training.objective`: the NAD loss (METHOD.md) and its selective variant, with
  :mod:`~nad_ext.training.negatives` (other classes' images in a task's batches);
- :mod:`~nad_ext.training.loop`: the step (:func:`train_step`), an epoch, all epochs of a run,
  :func:`train_in_memory`; :mod:`~nad_ext.training.step_graph`: the step replayed from CUDA graphs;
  :mod:`~nad_ext.training.nonfinite`: NaN or Inf gate gradients, found in every step, stop the
  run (:class:`NonFiniteGradientError`) or skip the task's step;
- :mod:`~nad_ext.training.fidelity`: the check after a run that each task's binary
  sub-architecture still does its task (not constant, near the original's own-class accuracy);
- :mod:`~nad_ext.training.calibration`: beta by short runs: the largest that keeps the tasks
  (by default), or the one for a target open ratio;
- :mod:`~nad_ext.training.driver`: :func:`disentangle`, the whole run;
- :mod:`~nad_ext.training.paths`: per-image routing paths, one task per image
  (:func:`learn_paths`, :func:`iter_paths`, :class:`PathSettings`), into a path store;
- :mod:`~nad_ext.training.rundir`: the run folder, consistent after any crash;
  :mod:`~nad_ext.training.commit`: the run folder across the ranks of a torchrun run.

May import: :mod:`nad_ext._utils`, :mod:`nad_ext.distributed`, :mod:`nad_ext.data`,
:mod:`nad_ext.models`, :mod:`nad_ext.gates`, :mod:`nad_ext.ops`. Not :mod:`nad_ext.analysis`:
training and analysis stand side by side, both reading and writing mask banks.
"""
from nad_ext.training.build import Network, build_gated_model
from nad_ext.training.calibration import CalibrationSettings, calibrate_beta, search_beta, search_beta_by_fidelity
from nad_ext.training.config import NADConfig
from nad_ext.training.driver import disentangle
from nad_ext.training.fidelity import FidelitySettings, FidelityWarning
from nad_ext.training.loop import train_in_memory, train_step
from nad_ext.training.nonfinite import NonFiniteGradientError
from nad_ext.training.objective import SELECTIVE_DEFAULTS
from nad_ext.training.paths import PathSettings, PathWarning, iter_paths, learn_paths

__all__ = [
    "CalibrationSettings", "FidelitySettings", "FidelityWarning", "NADConfig", "Network", "NonFiniteGradientError", "SELECTIVE_DEFAULTS",
    "PathSettings", "PathWarning", "build_gated_model", "calibrate_beta", "disentangle", "iter_paths", "learn_paths",
    "search_beta", "search_beta_by_fidelity", "train_in_memory", "train_step",
]
