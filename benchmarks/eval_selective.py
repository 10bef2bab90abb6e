"""The paper's objective against the selective one on the demo zoo: do the binary
sub-architectures keep their own class and reject the others?

For every zoo network and every objective (``r:gamma``; ``0:0`` is the paper's) it learns all
classes' gates with the demo's settings (its betas, 8 epochs, all classes in one step, same
seed) and measures on the validation images:

- own-class accuracy: the binary sub-architecture of class t predicts t on t's images;
- false positives on other classes: it predicts t on the other classes' images (all of them);
- the open-channel ratio (open channels / all channels, mean over tasks);
- the similarity structure: mean IoU over task pairs, and whether the original network's
  confusions land on similar sub-architectures (``analysis.confusion_vs_similarity``: share
  of misclassified images whose predicted class is among the true class's 3 most similar
  sub-architectures, against chance 3 / (T - 1)).

Each run's result is a JSON file in ``--out`` (a finished run is not repeated), and the table
is printed as Markdown. The zoo trains once into ``--cache`` (about 2.5 minutes on 2 cores).

    nice python benchmarks/eval_selective.py --cache .nad_cache --out nad_output/eval_selective \\
        --objectives 0:0 1:1 --networks zoo_plain zoo_residual zoo_dense zoo_nas

``--beta`` replaces the demo's beta of the given networks, ``--set lr=0.2`` other settings
(the selective demo's: ``--objectives 0.25:2 --set lr=0.2``, and ``--beta 0.1`` for zoo_plain).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from nad_ext import analysis, data, models
from nad_ext.demo import DEMO_BETAS, DEMO_EPOCHS
from nad_ext._utils.storage import atomic_write
from nad_ext.training import NADConfig, Network, build_gated_model, disentangle


def number_or_text(value: str):
    """A ``--set`` value: a number where it reads as one (lr=0.2), else the text (gate=annealed)."""
    try:
        return float(value)
    except ValueError:
        return value


def parse_objective(text: str) -> tuple[float, float]:
    try:
        r, gamma = (float(v) for v in text.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"objective must be r:gamma (e.g. 1:2; 0:0 is the paper's), got {text!r}") from err
    return r, gamma


def evaluate(name, model, accuracy, train, val, r, gamma, epochs, seed, out_dir: Path, beta=None,
             extra: dict | None = None) -> dict:
    extra = extra or {}
    stem = (f"{name}_r{r:g}_g{gamma:g}_e{epochs}_s{seed}" + (f"_b{beta:g}" if beta is not None else "")
            + "".join(f"_{k}{v}" for k, v in sorted(extra.items())))
    beta = DEMO_BETAS[name] if beta is None else beta
    path = out_dir / f"{stem}.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec = models.get_spec(name)
    config = NADConfig(beta=beta, epochs=epochs, image_size=spec.input_size, seed=seed,
                       tasks_per_step=len(train.classes), device="cpu", negatives=r, negative_weight=gamma,
                       keep_every_epoch=False, **extra)
    start = time.perf_counter()
    run_dir = out_dir / stem  # the mask bank and log.json (loss terms per epoch)
    bank = disentangle(Network(model, name, name), train, config=config, progress=False, out_dir=run_dir,
                       overwrite=True)
    train_seconds = time.perf_counter() - start
    gated = build_gated_model(model, [p.name for p in bank.gate_points], len(bank.tasks), spec.input_size,
                              model_id=name)
    masked = analysis.masked_accuracy(gated, bank, val, spec.input_size)
    stats = analysis.subarchitecture_stats(bank)
    sim = analysis.similarity(bank)
    pairs = np.triu_indices(len(bank.tasks), k=1)
    confusion = analysis.confusion_vs_similarity(gated, bank, val, spec.input_size)
    result = {
        "network": name, "settings": extra, "negatives": r, "negative_weight": gamma, "epochs": epochs, "seed": seed,
        "beta": beta, "validation_accuracy": accuracy,
        "original_accuracy": masked["mean"]["original_own_class_accuracy"],
        "own_class_accuracy": masked["mean"]["own_class_accuracy"],
        "original_false_positives": masked["mean"]["original_false_positive_rate"],
        "false_positives": masked["mean"]["false_positive_rate"],
        "balanced_accuracy": masked["mean"]["balanced_accuracy"],
        "original_balanced_accuracy": masked["mean"]["original_balanced_accuracy"],
        "worst_false_positives": max(t["false_positive_rate"] for t in masked["tasks"]),
        "worst_own_class_accuracy": min(t["own_class_accuracy"] for t in masked["tasks"]),
        "per_task": [{k: t[k] for k in ("task", "own_class_accuracy", "false_positive_rate")} for t in masked["tasks"]],
        "open_ratio_per_gate_point": stats["per_gate_point"]["mean"],
        "constant_tasks": _constant_tasks(masked),
        "open_ratio": stats["overall"],
        "mean_iou": float(sim[pairs].mean()),
        "confused_within_top3": confusion["fraction_rank_le_k"], "confused_chance": confusion["chance"],
        "misclassified": confusion["misclassified"],
        "top3_overlap": confusion["mean_overlap"], "top3_overlap_chance": confusion["chance_overlap"],
        "train_seconds": train_seconds,
    }
    payload = json.dumps(result, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(payload))
    return result


def _constant_tasks(masked: dict) -> int:
    """Tasks whose binary sub-architecture gives the same answer (t, or not t) on every image."""
    return sum(1 for t in masked["tasks"]
               if (t["own_class_accuracy"], t["false_positive_rate"]) in ((1.0, 1.0), (0.0, 0.0)))


def table(rows: list[dict]) -> str:
    head = ("| network (beta) | objective (r, gamma) | epochs (lr) | own-class accuracy (original) | false positives on other "
            "classes (worst task) | balanced accuracy | open channels (weighted) | mean IoU | confusions in top-3 "
            "similar (chance) | NAD s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        objective = "paper" if r["negatives"] == 0 else f"selective ({r['negatives']:g}, {r['negative_weight']:g})"
        lr = (r.get("settings") or {}).get("lr", NADConfig.lr)
        balanced = r.get("balanced_accuracy", (r["own_class_accuracy"] + 1 - r["false_positives"]) / 2)  # older runs
        lines.append(
            f"| {r['network']} ({r['beta']:g}) | {objective} | {r['epochs']} ({lr:g}) | "
            f"{r['own_class_accuracy']:.1%} ({r['original_accuracy']:.1%}) | "
            f"{r['false_positives']:.1%} ({r['worst_false_positives']:.1%}) | {balanced:.1%} | "
            f"{r['open_ratio']:.1%} | {r['mean_iou']:.2f} | {r['confused_within_top3']:.2f} ({r['confused_chance']:.2f}) | "
            f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=".nad_cache", help="the zoo's cache folder")
    parser.add_argument("--out", default="nad_output/eval_selective", help="one JSON file per run")
    parser.add_argument("--networks", nargs="+", default=list(models.ZOO))
    parser.add_argument("--objectives", nargs="+", type=parse_objective, default=[(0.0, 0.0), (1.0, 1.0)],
                        help="r:gamma pairs; 0:0 is the paper's objective")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=None, help="override the demo's beta for these networks")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="other NADConfig fields (numbers), e.g. lr=0.3 init_std=0.5")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = data.generated_shapes("train"), data.generated_shapes("val")
    zoo = models.load_zoo(args.cache, train, val, names=args.networks, progress=False)
    rows = []
    for name in args.networks:
        model, accuracy = zoo[name]
        for r, gamma in args.objectives:
            rows.append(evaluate(name, model, accuracy, train, val, r, gamma, args.epochs, args.seed, out_dir,
                                 args.beta, {k: number_or_text(v) for k, v in (a.split("=", 1) for a in args.set)}))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
