"""``nad demo``: the whole method on the built-in data and zoo, in minutes on a laptop CPU.

1. Generates the shapes data set (deterministic, offline) and trains (or loads from the cache)
   one small network per connection type of the paper: plain, residual, dense, NAS cell.
2. Disentangles every class of each network (batched mode, all classes in one pass).
3. Runs the paper's analyses on each mask bank and writes one HTML report comparing the four
   connection types, with a short text summary.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from nad_ext import analysis, data, models, report
from nad_ext.maskbank import atomic_write
from nad_ext.objective import SELECTIVE_DEFAULTS, describe_objective
from nad_ext.trainer import NADConfig, build_gated_model, disentangle, resolve_device

# The demo's NAD settings: the paper's update and defaults, fewer epochs than its 21 (the
# generated classes are simple and the run must fit in minutes on 2 CPU cores).
DEMO_EPOCHS = 8
DEMO_MOSAICS = 40
DEMO_BETAS = {"zoo_plain": 4.5, "zoo_residual": 0.02, "zoo_dense": 0.02, "zoo_nas": 0.45}


def run_demo(out_dir="nad_output/demo", *, cache_dir=".nad_cache", epochs=None, num_mosaics=None,
             device="auto", networks=None, images_per_class=None, zoo_epochs=None, progress=True,
             selective=False) -> dict:
    """Runs the demo; returns the summary that it also writes to ``out_dir/summary.json``.

    ``selective``: learn with the selective objective (``objective.SELECTIVE_DEFAULTS``; not the
    paper's) instead of the paper's, so that sub-architectures also reject other classes.

    ``networks`` (default: the whole zoo), ``images_per_class`` (train, val; default the data
    set's) and ``zoo_epochs`` (default ``models.ZOO_EPOCHS``) make smaller runs for tests.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    epochs = epochs or DEMO_EPOCHS
    num_mosaics = num_mosaics or DEMO_MOSAICS
    device = resolve_device(device)
    n_train, n_val = images_per_class or (None, None)
    train = data.generated_shapes("train", images_per_class=n_train)
    val = data.generated_shapes("val", images_per_class=n_val)
    print(f"data: {train} / {val}")
    zoo = models.load_zoo(cache_dir, train, val, names=networks, progress=progress, epochs=zoo_epochs)
    summary, results = {}, {}
    objective = SELECTIVE_DEFAULTS if selective else {}
    print(f"objective: {describe_objective(objective)}")
    for name, (model, accuracy) in zoo.items():
        spec = models.get_spec(name)
        print(f"\n{name} ({spec.connection}): validation accuracy {accuracy:.1%}")
        config = NADConfig(beta=DEMO_BETAS.get(name, spec.beta), epochs=epochs, image_size=spec.input_size,
                           tasks_per_step=len(train.classes), device=str(device), **objective)
        bank = disentangle(model, train, name, model_id=name, config=config, out_dir=out_dir / name,
                           overwrite=True, progress=progress)
        gated = build_gated_model(model, [p.name for p in bank.gate_points], len(bank.tasks),
                                  spec.input_size, model_id=name, device=device)
        results[name] = analysis.run_all(gated, bank, val, spec.input_size, out_dir / name,
                                         num_mosaics=num_mosaics, device=str(device))
        results[name]["connection"] = spec.connection
        summary[name] = _summarise(name, spec.connection, accuracy, bank, results[name])
        _print_summary(summary[name])
    report_path = report.write_report(results, out_dir / "report.html", metadata={
        "data": f"{train.name} ({len(train)} train / {len(val)} val images, {len(train.classes)} classes)",
        "objective": describe_objective(objective), "nad epochs": epochs, "mosaics": num_mosaics, "device": str(device),
        "betas": json.dumps({n: DEMO_BETAS.get(n) for n in zoo}),
    })
    payload = json.dumps(summary, indent=1)
    atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(payload))
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    print(f"results: {out_dir.resolve()}  (mask banks, analyses, summary.json)")
    print(f"report:  {Path(report_path).resolve()}")
    return summary


def _summarise(name, connection, accuracy, bank, result) -> dict:
    masked = result["masked_accuracy"]
    return {
        "connection": connection,
        "objective": describe_objective(bank.config),
        "validation_accuracy": accuracy,
        "gate_points": [p.name for p in bank.gate_points],
        "open_ratio_per_gate_point": bank.open_ratio().mean(dim=0).tolist(),
        "masked_accuracy_per_task": [
            {"task": row["task"], "original": row["original_accuracy"], "masked": row["accuracy"],
             "masked_rejection": row["rejection"]}
            for row in masked["tasks"]
        ],
        "mean_masked_accuracy": masked["mean"]["accuracy"],
        "mean_original_accuracy": masked["mean"]["original_accuracy"],
        "mean_masked_rejection": masked["mean"]["rejection"],
        "mean_original_rejection": masked["mean"]["original_rejection"],
        "mean_hit_rate_per_gate_point": result["hit_rate"]["mean"],
    }


def _print_summary(s: dict) -> None:
    ratios = " ".join(f"{r:.2f}" for r in s["open_ratio_per_gate_point"])
    print(f"  open-channel ratio per gate point: {ratios}")
    print(f"  own-class accuracy, original network {s['mean_original_accuracy']:.1%} -> "
          f"binary sub-architectures {s['mean_masked_accuracy']:.1%} (mean over tasks)")
    print(f"  predicted as the task's class on other classes' images: original "
          f"{s['mean_original_rejection']:.1%} -> sub-architectures {s['mean_masked_rejection']:.1%}")
    worst = min(s["masked_accuracy_per_task"], key=lambda t: t["masked"])
    print(f"  weakest task: {worst['task']} {worst['original']:.1%} -> {worst['masked']:.1%}; "
          f"open channels {np.mean(s['open_ratio_per_gate_point']):.0%} on average")
