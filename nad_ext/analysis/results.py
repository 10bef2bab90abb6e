"""All analyses at once (:func:`run_all`), written to a folder and read back
(:func:`load_results`) for reports made later."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from nad_ext._utils.storage import atomic_write
from nad_ext.analysis.accuracy import _measures, confusion_vs_similarity, masked_accuracy
from nad_ext.analysis.common import _check_inputs, _sequential
from nad_ext.analysis.hit_rate import _check_mosaic_args, _mosaic_classes, hit_rate
from nad_ext.analysis.masks import cluster_order, layerwise_similarity, similarity, subarchitecture_stats
from nad_ext.data.imagesets import ImageSet
from nad_ext.gates.maskbank import MaskBank, describe_objective
from nad_ext.gates.model import GatedModel


def _jsonable(value):
    """Plain JSON types; NaN -> None; arrays -> lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _matrix_csv(matrix: np.ndarray, names: Sequence[str]) -> str:
    quote = lambda s: '"' + str(s).replace('"', '""') + '"'  # noqa: E731
    lines = [",".join(["task"] + [quote(n) for n in names])]
    lines += [",".join([quote(n)] + [f"{v:.6f}" for v in row]) for n, row in zip(names, matrix)]
    return "\n".join(lines) + "\n"


def run_all(gated: GatedModel, bank: MaskBank, val_images: ImageSet, image_size: int, out_dir: str | Path,
            *, num_mosaics: int = 100, top_fraction: float = 0.10, seed: int = 0, null_samples: int = 1,
            k: int = 3, batch_size: int = 64, device: str = "cpu", num_examples: int = 2,
            other_images_per_class: int | None = None, map_units=_sequential, write: bool = True,
            progress: bool = False) -> dict:
    """Runs analyses 1-5 and writes them to ``out_dir`` (unless ``write`` is False: the other
    processes of a distributed run).

    Files: ``results.json`` (everything but the example arrays), ``similarity_iou.csv``,
    ``similarity_iomin.csv`` (task x task, in bank order) and ``hit_rate_examples.npz``
    (the example mosaics and maps). The returned dict holds all results, arrays included; the
    confusion analysis is ``{"skipped": reason}`` when the bank is not one task per class.
    The keyword arguments go to the analyses of the same names (``num_mosaics`` and
    ``other_images_per_class`` set most of the cost); ``map_units`` shares the work (see the
    module's docstring); ``progress``: a progress bar per analysis.
    """
    _check_inputs(gated, bank, val_images, image_size)
    _check_mosaic_args(num_mosaics, top_fraction, null_samples)
    _mosaic_classes(bank, val_images)
    out_dir = Path(out_dir)
    iou, iomin = similarity(bank, "iou"), similarity(bank, "iomin")
    results = {
        "model_id": bank.model_id,
        "objective": describe_objective(bank.config),
        "tasks": bank.task_names,
        "stats": subarchitecture_stats(bank),
        # How beta was found and the run's own fidelity check (None when not made): for the report.
        "calibration": bank.calibration,
        "fidelity": bank.fidelity,
        "similarity": {"iou": iou, "iomin": iomin, "order": cluster_order(iou)},
        "layerwise_similarity": layerwise_similarity(bank),
        "masked_accuracy": masked_accuracy(gated, bank, val_images, image_size, batch_size, device,
                                           other_images_per_class, map_units, progress),
        "hit_rate": hit_rate(gated, bank, val_images, image_size, num_mosaics, top_fraction, seed,
                             null_samples, device, batch_size, num_examples, map_units=map_units,
                             progress=progress),
    }
    try:
        results["confusion"] = confusion_vs_similarity(gated, bank, val_images, image_size, k, device, batch_size,
                                                       map_units, progress)
    except ValueError as err:
        results["confusion"] = {"skipped": str(err)}
    examples = results["hit_rate"]["examples"]
    arrays = {f"example{e}_mosaic": ex["mosaic"] for e, ex in enumerate(examples)}
    for e, ex in enumerate(examples):
        for q, per_layer in enumerate(ex["maps"]):
            for layer, m in enumerate(per_layer):
                if m is not None:
                    arrays[f"example{e}_class{q}_layer{layer:03d}"] = m
    stripped = dict(results, hit_rate=dict(results["hit_rate"], examples=[
        {key: v for key, v in ex.items() if key not in ("mosaic", "maps")} for ex in examples]))
    if not write:
        return results
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "results.json", json.dumps(_jsonable(stripped), indent=1))
    _write_text(out_dir / "similarity_iou.csv", _matrix_csv(iou, bank.task_names))
    _write_text(out_dir / "similarity_iomin.csv", _matrix_csv(iomin, bank.task_names))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(out_dir / "hit_rate_examples.npz", lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return results


def load_results(out_dir: str | Path) -> dict:
    """Reads what :func:`run_all` wrote to ``out_dir`` back into its result dict (the example
    mosaics and maps included), for reports made later (``nad report``)."""
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `nad analyze ... --out {out_dir}` first")
    results = json.loads(path.read_text())
    _rename_old_measures(results.get("masked_accuracy") or {})
    npz = out_dir / "hit_rate_examples.npz"
    if npz.is_file():
        arrays = np.load(npz)
        num_layers = len(results["stats"]["per_gate_point"]["mean"])
        for e, ex in enumerate(results["hit_rate"]["examples"]):
            if f"example{e}_mosaic" in arrays:
                ex["mosaic"] = arrays[f"example{e}_mosaic"]
                ex["maps"] = [[arrays.get(f"example{e}_class{q}_layer{layer:03d}") for layer in range(num_layers)]
                              for q in range(4)]
    return results


def _rename_old_measures(acc: dict) -> None:
    """Results written before the measures were renamed (accuracy, rejection) get today's keys."""
    for row in acc.get("tasks", []) + [acc.get("mean", {})]:
        for prefix in ("", "original_"):
            if f"{prefix}accuracy" in row and f"{prefix}rejection" in row:
                own, fp = row.pop(f"{prefix}accuracy"), row.pop(f"{prefix}rejection")
                nan = float("nan")
                row.update(_measures(nan if own is None else own, nan if fp is None else fp, prefix))
