"""The NAD training driver: learns every task's gates on a frozen network, into a run folder.

:func:`disentangle` resolves the run's settings, joins the torchrun world (when there is one),
opens the run folder (:mod:`nad_ext.training.rundir`, shared across ranks by
:mod:`nad_ext.training.commit`), calibrates beta when asked to (:mod:`nad_ext.training.calibration`)
and trains the remaining epochs (:func:`nad_ext.training.loop.run_epochs`). Under torchrun the
tasks are shared out among the processes (:mod:`nad_ext.distributed`); every process returns
the same bank, bit-identical to a single-process run's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nad_ext import distributed
from nad_ext.data import ImageSet
from nad_ext.data import pipeline as nad_pipeline
from nad_ext.gates.maskbank import MaskBank, Task
from nad_ext.training.build import Network
from nad_ext.training.calibration import CalibrationSettings, calibrate_beta
from nad_ext.training.commit import SharedRun
from nad_ext.training.config import NADConfig, resolve_run
from nad_ext.training.fidelity import FidelityCheck, FidelitySettings
from nad_ext.training.loop import run_epochs
from nad_ext.training.rundir import BANK_FILE


def disentangle(
    network: Network,
    train: ImageSet,
    *,
    tasks: Sequence[Task] | None = None,
    config: NADConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool | str = False,
    overwrite: bool = False,
    progress: bool = True,
    calibration: CalibrationSettings | None = None,
    fidelity: bool | FidelitySettings = True,
    check_images: ImageSet | None = None,
) -> MaskBank:
    """Learns the gates of every task on the frozen network; returns the mask bank.

    Args:
        network: what is gated (:class:`~nad_ext.training.build.Network`: the model, its gate
            points or preset name, its model id, units and channel axes).
        train: the training images.
        tasks: default one per class.
        config: :class:`~nad_ext.training.config.NADConfig`, default the paper's settings (beta
            and image size from the model preset when ``network.model_id`` names one).
            ``beta="auto"`` first runs :func:`~nad_ext.training.calibration.calibrate_beta`
            (with ``calibration``'s settings); the bank then holds the beta found and how
            (``bank.calibration``). A resumed run keeps its bank's beta.
        out_dir: the run folder (:mod:`nad_ext.training.rundir`): ``masks.safetensors``
            committed after every epoch, per-epoch copies and ``log.json`` (loss curves). None
            keeps everything in memory. Locked while the run writes it.
        resume: continue the run in ``out_dir`` from its last committed epoch (a folder without
            a bank starts a new run, with a note; ``"strict"`` refuses to).
        overwrite: replace an existing run in ``out_dir`` instead of refusing to.
        progress: show a progress bar per epoch (rank 0 only under torchrun).
        calibration: how ``beta="auto"`` measures (default :class:`CalibrationSettings`).
        fidelity: after the last epoch, check that each task's binary sub-architecture still does
            its task (:mod:`nad_ext.training.fidelity`; True: the default
            :class:`~nad_ext.training.fidelity.FidelitySettings`, False: no check). The figures go
            into the bank (``bank.fidelity``) and log.json; a :class:`FidelityWarning` names the
            tasks whose sub-architecture is constant or keeps less than half the original's
            own-class accuracy.
        check_images: the images of that check, e.g. the validation split (default: ``train``).

    Under torchrun the tasks are shared out among the processes (:mod:`nad_ext.distributed`);
    every process returns the same bank, bit-identical to a single-process run's.
    """
    config, tasks, indices = resolve_run(train, network.model_id, tasks, config)
    check = fidelity_check(fidelity, train, check_images)
    ctx = distributed.setup(config.device)
    progress = progress and ctx.rank == 0
    run = SharedRun.open(ctx, out_dir, resume=resume, overwrite=overwrite, keep_every_epoch=config.keep_every_epoch)
    try:
        found = None  # how beta was calibrated
        if config.beta == "auto":
            config.beta, found = auto_beta(run, network, train, tasks, config, calibration, progress, check_images)
        with nad_pipeline.make_loader(train, config.image_size, ctx.device, config.data_pipeline,
                                      config.on_bad_image) as loader:
            bank = run_epochs(network, tasks, indices, config, run, loader, progress, found, len(train),
                              len(train.classes), check)
        if check is not None and bank.fidelity is not None and ctx.rank == 0:
            check.warn(bank)
        return bank
    finally:
        run.close()


def fidelity_check(fidelity: bool | FidelitySettings, train: ImageSet, check_images: ImageSet | None
                   ) -> FidelityCheck | None:
    """The run's fidelity check (None when ``fidelity`` is False)."""
    if fidelity is False:
        return None
    settings = FidelitySettings() if fidelity is True else fidelity
    if not isinstance(settings, FidelitySettings):
        raise TypeError(f"fidelity must be True, False or FidelitySettings, got {type(fidelity).__name__}")
    if check_images is None:
        return FidelityCheck(train, "training images", settings)
    if check_images.classes != train.classes:
        raise ValueError("check_images must have the training images' classes, in the same order: "
                         f"{len(check_images.classes)} classes against {len(train.classes)}")
    return FidelityCheck(check_images, "validation images", settings)


def auto_beta(run: SharedRun, network: Network, train: ImageSet, tasks: list[Task], config: NADConfig,
              settings: CalibrationSettings | None, progress: bool, check_images: ImageSet | None
              ) -> tuple[float, dict | None]:
    """beta="auto": a resumed run keeps its bank's beta; a new one calibrates it. Under torchrun
    every rank calibrates (the same short runs, at once) and all take rank 0's result."""
    if run.bank is not None:
        beta = run.bank.config.get("beta")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool):
            raise ValueError(f"{run.file(BANK_FILE)} holds no numeric beta to resume with ({beta!r})")
        return float(beta), run.bank.calibration
    found, error = None, None
    try:
        found = calibrate_beta(network, train, tasks=tasks, config=config, settings=settings, progress=progress,
                               check_images=check_images)
    except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = err
    run.ctx.agree(error, "calibrating beta")
    found = run.ctx.broadcast(found)
    return found["beta"], found
