"""``nad demo``: the whole method on the built-in data and zoo, in minutes on a laptop CPU.

1. Generates the shapes data set (deterministic, offline) and trains (or loads from the cache)
   one small network per connection type of the paper: plain, residual, dense, NAS cell, and
   a small vision transformer (whose beta is calibrated, as the paper has none for it).
2. Disentangles every class of each network (batched mode, all classes in one pass).
3. Runs the paper's analyses on each mask bank and writes one HTML report comparing the five
   connection types, with a short text summary.
4. With ``paths`` (``nad demo --paths``): the per-image routing path of every validation image
   on each CNN against its class sub-architectures, with a far-path detector of attacked images
   (:func:`nad_ext.path_study.analyze_paths`, issue 26): ``<network>/paths.json`` and a section of the report.

May import: everything but :mod:`nad_ext.cli` (the demo is the whole path through the code).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from nad_ext import analysis, data, models, path_study, report
from nad_ext._utils.storage import atomic_write
from nad_ext.distributed import resolve_device
from nad_ext.gates.maskbank import describe_objective
from nad_ext.training import (SELECTIVE_DEFAULTS, CalibrationSettings, NADConfig, Network, PathSettings,
                              build_gated_model, disentangle)

# The demo's NAD settings: the paper's update and defaults, fewer epochs than its 21 (the
# generated classes are simple and the run must fit in minutes on 2 CPU cores).
DEMO_EPOCHS = 8
DEMO_MOSAICS = 40
DEMO_BETAS = {"zoo_plain": 4.5, "zoo_residual": 0.02, "zoo_dense": 0.02, "zoo_nas": 0.45, "zoo_vit": "auto"}
# The transformer has no beta from the paper: calibrated (the default criterion: the largest
# beta whose sub-architectures keep their task, nad_ext.training.calibration) on 2 of the
# classes, with the run's own epochs, in at most 6 short runs (each about a fifth of the ViT's
# NAD run).
DEMO_CALIBRATION = CalibrationSettings(num_tasks=2, runs=6)
# The selective demo (``--selective``, training.objective.SELECTIVE_DEFAULTS), as evaluated in
# benchmarks/RESULTS.md ("Selective sub-architectures on the zoo"): lr 0.2, so that 8 epochs
# move the gates as far as 16 at the paper's 0.1 (the negative term needs that distance; the
# two give the same gates' measures on zoo_residual), and beta 0.1 for the plain network: at
# 4.5 (or 1) its sub-architectures close most of every layer and answer the same for every
# image, which no weight on the negatives undoes. The ViT gets beta 5 (the top of the paper's
# range) instead of a calibrated one: calibration aims at the paper's open ratio of 0.3, where
# the selective ViT keeps 20% of its channels and accepts 24% of other classes' images; at 5 it
# keeps 90% and accepts 3% (RESULTS, "main after this stop's merges").
DEMO_SELECTIVE_LR = 0.2
DEMO_SELECTIVE_BETAS = {**DEMO_BETAS, "zoo_plain": 0.1, "zoo_vit": 5.0}


def run_demo(out_dir="nad_output/demo", *, cache_dir=".nad_cache", epochs=None, num_mosaics=None,
             device="auto", networks=None, images_per_class=None, zoo_epochs=None, progress=True,
             selective=False, paths=False) -> dict:
    """Runs the demo; returns the summary that it also writes to ``out_dir/summary.json``.

    ``selective``: learn with the selective objective (``training.SELECTIVE_DEFAULTS``; not the
    paper's) instead of the paper's, so that sub-architectures also reject other classes, with
    ``DEMO_SELECTIVE_LR`` and ``DEMO_SELECTIVE_BETAS``.

    ``paths``: after each CNN's class run, :func:`~nad_ext.path_study.analyze_paths` on every validation image
    with :func:`demo_path_settings` (the transformer is skipped), written to
    ``out_dir/<network>/paths.json``, summarised and reported.

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
        config = NADConfig(epochs=epochs, image_size=spec.input_size, tasks_per_step=len(train.classes),
                           device=str(device), **demo_settings(name, selective))
        bank = disentangle(Network(model, name, name), train, config=config, out_dir=out_dir / name,
                           overwrite=True, progress=progress, calibration=DEMO_CALIBRATION, check_images=val)
        gated = build_gated_model(model, bank.gate_points, len(bank.tasks), spec.input_size, model_id=name,
                                  device=device)
        results[name] = analysis.run_all(gated, bank, val, spec.input_size, out_dir / name,
                                         num_mosaics=num_mosaics, device=str(device), progress=progress)
        results[name]["connection"] = spec.connection
        summary[name] = _summarise(name, spec.connection, accuracy, bank, results[name])
        summary[name]["beta"] = bank.config["beta"]
        if bank.calibration is not None:
            summary[name]["beta_calibration"] = bank.calibration
        if bank.fidelity is not None:
            summary[name]["fidelity_flagged"] = bank.fidelity["flagged"]
        _print_summary(summary[name], explain=len(summary) == 1)
        if paths and spec.connection != "transformer":
            found = path_study.analyze_paths(Network(model, name, name), bank, val,
                                             settings=demo_path_settings(bank, device), attack=DEMO_ATTACK,
                                             eps=DEMO_ATTACK_EPS, progress=progress)
            payload = json.dumps(found, indent=1)
            atomic_write(out_dir / name / "paths.json", lambda tmp, text=payload: Path(tmp).write_text(text))
            results[name]["paths"] = found
            summary[name]["paths"] = _summarise_paths(found)
            print(f"  {paths_line(found)}")
    report_path = report.write_report(results, out_dir / "report.html", metadata={
        "data": f"{train.name} ({len(train)} train / {len(val)} val images, {len(train.classes)} classes)",
        "objective": describe_objective(objective), "nad epochs": epochs, "mosaics": num_mosaics,
        **({"paths": f"steps {PathSettings.steps}, views {PathSettings.views}, init_std {PathSettings.init_std}, "
                      f"target prediction, {DEMO_ATTACK.upper()} eps {DEMO_ATTACK_EPS:.4g}"} if paths else {}),
        "device": str(device), "lr": DEMO_SELECTIVE_LR if selective else NADConfig.lr,
        "betas": json.dumps({n: summary[n]["beta"] if "beta_calibration" not in summary[n]
                             else f"{summary[n]['beta']:.3g} (calibrated)" for n in zoo}),
    })
    payload = json.dumps(summary, indent=1)
    atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(payload))
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    print(f"results: {out_dir.resolve()}  (mask banks, analyses{', paths' if paths else ''}, summary.json)")
    print(f"report:  {Path(report_path).resolve()}")
    return summary


def demo_settings(name: str, selective: bool = False) -> dict:
    """The demo's NAD settings of network ``name`` that differ between the objectives: beta,
    lr and (selective) the negatives and their weight."""
    if not selective:
        return {"beta": DEMO_BETAS.get(name, models.get_spec(name).beta), "lr": NADConfig.lr}
    return {"beta": DEMO_SELECTIVE_BETAS.get(name, models.get_spec(name).beta), "lr": DEMO_SELECTIVE_LR,
            **SELECTIVE_DEFAULTS}


def _summarise(name, connection, accuracy, bank, result) -> dict:
    masked, stats = result["masked_accuracy"], result["stats"]
    measures = [k for k in masked["mean"]]
    return {
        "connection": connection,
        "objective": describe_objective(bank.config),
        "validation_accuracy": accuracy,
        "gate_points": [p.name for p in bank.gate_points],
        "channels": stats["channels"],
        "open_channels_weighted": stats["overall"],
        "open_ratio_per_gate_point": stats["per_gate_point"]["mean"],
        "per_task": [{"task": row["task"], **{k: row[k] for k in measures}} for row in masked["tasks"]],
        "mean_over_tasks": dict(masked["mean"]),
        "mean_hit_rate_per_gate_point": result["hit_rate"]["mean"],
    }


def _print_summary(s: dict, explain: bool = False) -> None:
    """The network's block of the console summary; ``explain`` adds what the measures mean."""
    tasks = len(s["per_task"])
    if "beta_calibration" in s:
        cal = s["beta_calibration"]
        if cal.get("criterion", "open_ratio") == "open_ratio":
            print(f"  beta {s['beta']:.3g}, calibrated for open ratio {cal['target_open_ratio']:.2f} "
                  f"({cal['runs']} short runs; measured {cal['open_ratio']:.2f})")
        else:
            balanced = cal["balanced_accuracy"]
            print(f"  beta {s['beta']:.3g}, calibrated: the largest beta whose sub-architectures keep their task "
                  f"({cal['runs']} short runs; open ratio {cal['open_ratio']:.2f}, balanced accuracy "
                  f"{'n/a' if balanced is None else f'{balanced:.2f}'})")
    if s.get("fidelity_flagged"):
        print(f"  fidelity check: {len(s['fidelity_flagged'])} sub-architecture(s) do not do their task: "
              + "; ".join(f"{n} ({why})" for n, why in s["fidelity_flagged"][:3]))
    print(f"  {analysis.OPEN_CHANNELS}: {s['open_channels_weighted']:.1%} of {sum(s['channels'])} "
          f"(mean over {tasks} tasks)")
    ratios = " ".join(f"{r:.2f}" for r in s["open_ratio_per_gate_point"])
    print(f"  open-channel ratio per gate point: {ratios}")
    names = (analysis.OWN_CLASS_ACCURACY, analysis.FALSE_POSITIVES, analysis.BALANCED_ACCURACY)
    keys = ("own_class_accuracy", "false_positive_rate", "balanced_accuracy")
    widths = [max(len(n), 6) for n in names]
    print(f"  binary sub-architectures against the original network, mean over {tasks} tasks:")
    print("    " + " " * 18 + "   ".join(n.rjust(w) for n, w in zip(names, widths)))
    mean = s["mean_over_tasks"]
    for label, prefix in (("original network", "original_"), ("sub-architectures", "")):
        print(f"    {label:18s}" + "   ".join(_percent(mean[prefix + k]).rjust(w) for k, w in zip(keys, widths)))
    if explain:
        print(f"    ({analysis.MEASURES_MEANING})")
    print(f"  {_weakest_task(s['per_task'])}")


def _percent(value) -> str:
    return "-" if value is None or value != value else f"{value:.1%}"


def _weakest_task(rows: list[dict]) -> str:
    """The task with the lowest balanced accuracy of its sub-architecture; ties go to the task
    the original network handles worst, and a full tie is said as such."""
    key = lambda r: (r["balanced_accuracy"], r["original_balanced_accuracy"])  # noqa: E731
    worst = min(rows, key=key)
    balanced = f"{analysis.BALANCED_ACCURACY} {_percent(worst['balanced_accuracy'])}"
    original = f"original network {_percent(worst['original_balanced_accuracy'])}"
    if len(rows) > 1 and all(key(r) == key(worst) for r in rows):
        return f"all {len(rows)} tasks tie: {balanced} ({original})"
    detail = (f"{analysis.OWN_CLASS_ACCURACY} {_percent(worst['own_class_accuracy'])}, "
              f"{analysis.FALSE_POSITIVES} {_percent(worst['false_positive_rate'])}")
    tied = sum(r["balanced_accuracy"] == worst["balanced_accuracy"] for r in rows)
    if tied > 1:
        return (f"weakest task: {worst['task']} ({tied} tasks tie at {balanced}, so the tie goes to the original "
                f"network's weakest: {_percent(worst['original_balanced_accuracy'])}); {detail}")
    return f"weakest task: {worst['task']}: {balanced} ({original}); {detail}"


# ----------------------------------------------------------------------------------------------
# Per-image paths (issue 26): ``nad demo --paths``

# ``nad demo --paths`` trains every path with nad paths' defaults (PathSettings: 20 steps of 4
# views from gates N(0, 0.01^2)), the class run's beta, lr and objective. On the four CNNs' 500
# validation images, clean and attacked, that took 352-403 s on 2 CPU cores (float32, the
# folded path; 1 step: 26 s, 10 steps: ~190 s) and gave top-1 path-to-class agreement 58-84%
# against 39-54% at 1 step (benchmarks/RESULTS.md, "Per-image paths, again").
DEMO_ATTACK = "fgsm"
DEMO_ATTACK_EPS = 8 / 255


def demo_path_settings(bank, device="cpu") -> PathSettings:
    """The demo's path settings for the class run ``bank``: its beta, lr and objective, the
    rest :class:`PathSettings`' defaults."""
    return PathSettings.from_config(bank.config, device=str(device))


def _summarise_paths(found: dict) -> dict:
    a, b, det = found["path_to_class"], found["misclassified"], found["detector"]
    return {"top1_label": a["top1_label"], "top1_prediction": a["top1_prediction"], "chance_top1": a["chance"]["top1"],
            "misclassified": b["misclassified"], "share_closer_to_prediction": b["share_closer_to_prediction"],
            "accuracy_clean": found["attack"]["accuracy_clean"],
            "accuracy_attacked": found["attack"]["accuracy_attacked"],
            "detector_auc": det["all"] and det["all"]["auc"], "seconds": sum(found["seconds"].values())}


def paths_line(found: dict) -> str:
    """The console's one line on a network's per-image paths."""
    s = _summarise_paths(found)
    share = "n/a" if s["share_closer_to_prediction"] is None else f"{s['share_closer_to_prediction']:.2f}"
    auc = "n/a" if s["detector_auc"] is None else f"{s['detector_auc']:.2f}"
    attack = found["attack"]
    return (f"per-image paths ({found['images']} images, {s['seconds']:.0f} s): path-to-class top-1 agreement with "
            f"the label {s['top1_label']:.1%} (chance {s['chance_top1']:.1%}); {s['misclassified']} misclassified, "
            f"{share} of them closer to the predicted class (chance 0.50); {attack['method'].upper()} "
            f"{attack['eps']:.3g}: accuracy {s['accuracy_clean']:.1%} -> {s['accuracy_attacked']:.1%}, "
            f"detector AUC {auc} (chance 0.50)")
