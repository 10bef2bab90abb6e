"""Sub-architectures on real data (issue 27): the paper's objective at several betas, beta
calibrated by fidelity and by open ratio, and the selective defaults, on networks trained here on
scikit-learn's digits (1,797 8x8 scans, 10 classes, shipped inside the scikit-learn wheel; 80/20
split per class, seed 0; see python_tests/real_digits.py).

Networks (``--networks``):

- ``digits_cnn``: three conv-BN-ReLU blocks, global pool, linear (98.1% on val), gated at the
  three ReLUs;
- ``resnet18``: torchvision's resnet18 (10 outputs, its ImageNet stem: 32x32 inputs reach
  layer4 at 1x1), trained 4 epochs here (98.9%), gated at the maxpool and the 8 blocks' outputs;
- ``digits_cnn_crops``: the same CNN, every other training batch made of NAD's own training crops
  (RandomResizedCrop (0.08, 1.25) + flip, as the gates see the images).

For each network and each run (``--runs``): the binary sub-architectures' own-class accuracy,
false positives and balanced accuracy on all of val (``analysis.masked_accuracy``), the same
with soft gates (sigmoid(m) as trained), the open ratio, how many tasks the fidelity check flags
and calls constant, the beta used (and the calibration's curve), seconds. The Markdown table is
printed; every row goes into the JSON file ``--out`` as it is measured (a row already there is
not rerun).

    nice python benchmarks/eval_real_data.py --out /tmp/notes/real_data.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
import real_digits  # noqa: E402

from nad_ext import analysis  # noqa: E402
from nad_ext.training import (SELECTIVE_DEFAULTS, CalibrationSettings, FidelityWarning, NADConfig,  # noqa: E402
                              Network, build_gated_model, disentangle)

SIZE = real_digits.IMAGE_SIZE
RESNET18_POINTS = ["maxpool"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
# The selective objective's r and gamma; the gates' training is named in each run ("selective-0.1":
# soft gates, as before issue 27's study; "selective-an0.2-0.1": annealed to 0.2, the defaults after it).
SELECTIVE = {k: SELECTIVE_DEFAULTS[k] for k in ("negatives", "negative_weight")}
# name: (objective, beta, calibration criterion); more by name in parse_run
RUNS = {
    "paper-1": ({}, 1.0, None),
    "paper-0.1": ({}, 0.1, None),
    "paper-0.02": ({}, 0.02, None),
    "paper-auto-fidelity": ({}, "auto", "fidelity"),
    "paper-auto-open-ratio": ({}, "auto", "open_ratio"),
    "selective-1": (SELECTIVE, 1.0, None),
    "selective-0.1": (SELECTIVE, 0.1, None),
    "selective-defaults-auto-fidelity": (SELECTIVE_DEFAULTS, "auto", "fidelity"),
}


def parse_run(name: str):
    """RUNS[name], or a run spelled ``<paper|selective>[-st|-an<TAU>]-<beta>[-r<R>][-g<GAMMA>]``
    (``st``: straight-through gates; ``an<TAU>``: gates annealed to temperature TAU; r and gamma
    override the selective defaults)."""
    if name in RUNS:
        return RUNS[name]
    parts = name.split("-")
    try:
        objective = dict(SELECTIVE) if parts[0] == "selective" else {}
        if parts[0] not in ("paper", "selective"):
            raise ValueError
        rest = parts[1:]
        if rest and rest[0] == "st":
            objective["gate"], rest = "straight_through", rest[1:]
        elif rest and rest[0].startswith("an"):
            objective["gate"], objective["gate_temperature"], rest = "annealed", float(rest[0][2:]), rest[1:]
        beta = float(rest[0])
        for part in rest[1:]:
            key = {"r": "negatives", "g": "negative_weight"}[part[0]]
            objective[key] = float(part[1:])
    except (ValueError, IndexError, KeyError):
        raise argparse.ArgumentTypeError(f"unknown run {name!r}: one of {', '.join(RUNS)} or "
                                         "<paper|selective>[-st|-an<TAU>]-<beta>[-r<R>][-g<GAMMA>]") from None
    return objective, beta, None


def make_network(name: str, train, val, seed: int):
    """(model, gate points, validation accuracy, seconds to train)."""
    start = time.perf_counter()
    if name == "digits_cnn":
        model, acc = real_digits.train_digits_cnn(train, val, epochs=10, seed=seed)
        points = real_digits.GATE_POINTS
    elif name == "digits_cnn_crops":
        model, acc = real_digits.train_digits_cnn(train, val, epochs=10, seed=seed, crops=True)
        points = real_digits.GATE_POINTS
    elif name == "resnet18":
        import torchvision

        torch.manual_seed(seed)
        model, acc = real_digits.train_digits_cnn(train, val, epochs=4, seed=seed, lr=2e-3,
                                                  model=torchvision.models.resnet18(num_classes=10))
        points = RESNET18_POINTS
    else:
        raise SystemExit(f"unknown network {name!r}: digits_cnn, digits_cnn_crops or resnet18")
    return model, points, acc, time.perf_counter() - start


def evaluate(network: str, run: str, model, points, train, val, epochs: int, seed: int, cal_epochs: int,
             cal_runs: int, lr: float = NADConfig.lr) -> dict:
    objective, beta, criterion = parse_run(run)
    config = NADConfig(beta=beta, epochs=epochs, image_size=SIZE, seed=seed, tasks_per_step=len(train.classes),
                       device="cpu", keep_every_epoch=False, lr=lr, **objective)
    calibration = CalibrationSettings(num_tasks=3, epochs=cal_epochs, runs=cal_runs, criterion=criterion) \
        if criterion else None
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = disentangle(Network(model, points, network), train, config=config, progress=False, check_images=val,
                           calibration=calibration)
    seconds = time.perf_counter() - start
    warned = [str(w.message) for w in caught if issubclass(w.category, FidelityWarning)]
    gated = build_gated_model(model, points, len(bank.tasks), SIZE, model_id=network)
    full = analysis.masked_accuracy(gated, bank, val, SIZE)  # loads the bank's gates into gated
    gated.set_temperature(config.gate_temperature if config.gate == "annealed" else 1.0)  # as trained last
    soft = analysis.masked_accuracy(gated, bank, val, SIZE, binary=False)["mean"]
    stats = analysis.subarchitecture_stats(bank)
    fid = bank.fidelity
    mean = full["mean"]
    return {
        "network": network, "run": run, "objective": "selective" if objective.get("negatives") else "paper",
        "gate": config.gate, "gate_temperature": config.gate_temperature if config.gate == "annealed" else None,
        "negatives": objective.get("negatives", 0.0), "negative_weight": objective.get("negative_weight", 0.0),
        "beta": float(bank.config["beta"]), "epochs": epochs, "lr": config.lr, "seed": seed,
        "calibration": None if bank.calibration is None else {
            k: bank.calibration.get(k) for k in ("criterion", "beta", "converged", "curve", "epochs", "runs")},
        "own_class_accuracy": mean["own_class_accuracy"], "false_positives": mean["false_positive_rate"],
        "balanced_accuracy": mean["balanced_accuracy"],
        "original_own_class_accuracy": mean["original_own_class_accuracy"],
        "original_false_positives": mean["original_false_positive_rate"],
        "soft": soft,
        "open_ratio": stats["overall"], "open_ratio_per_gate_point": stats["per_gate_point"]["mean"],
        "flagged": len(fid["flagged"]), "constant": int(sum(fid["constant"])),
        "check_balanced_accuracy": sum(fid["balanced_accuracy"]) / len(fid["balanced_accuracy"]),
        "warned": bool(warned), "seconds": seconds,
        "per_task": [{k: t[k] for k in ("task", "own_class_accuracy", "false_positive_rate")} for t in full["tasks"]],
    }


def table(rows: list[dict], networks: dict) -> str:
    lines = ["| network (val accuracy) | run | beta | epochs (lr) | own-class accuracy (original) | false positives "
             "(original) | balanced | soft gates: own / FP / balanced | open ratio | flagged (constant) of 10 | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["soft"]
        beta = f"{r['beta']:.3g}" + ("" if r["calibration"] is None else
                                     f" (auto, {'converged' if r['calibration']['converged'] else 'not converged'})")
        lines.append(
            f"| {r['network']} ({networks.get(r['network'], float('nan')):.1%}) | {r['run']} | {beta} | {r['epochs']} ({r['lr']:g}) | "
            f"{r['own_class_accuracy']:.1%} ({r['original_own_class_accuracy']:.1%}) | "
            f"{r['false_positives']:.1%} ({r['original_false_positives']:.1%}) | {r['balanced_accuracy']:.1%} | "
            f"{s['own_class_accuracy']:.1%} / {s['false_positive_rate']:.1%} / {s['balanced_accuracy']:.1%} | "
            f"{r['open_ratio']:.1%} | {r['flagged']} ({r['constant']}) | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="nad_output/eval_real_data.json", help="the results (JSON), kept as they come")
    parser.add_argument("--networks", nargs="+", default=["digits_cnn", "resnet18"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="names from RUNS or parse_run's spelling")
    parser.add_argument("--epochs", type=int, default=8, help="NAD epochs (the paper: 21)")
    parser.add_argument("--resnet-epochs", type=int, default=4, help="NAD epochs on resnet18")
    parser.add_argument("--lr", type=float, default=NADConfig.lr, help="NAD's learning rate (the paper: 0.1)")
    parser.add_argument("--calibration-epochs", type=int, default=2)
    parser.add_argument("--calibration-runs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="the split's, the networks' and NAD's seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core VM)")
    args = parser.parse_args(argv)
    for run in args.runs:
        parse_run(run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.read_text()) if out.is_file() else {"networks": {}, "rows": []}
    train, val = real_digits.digit_sets(seed=args.seed)
    rows = []
    with real_digits.threads(args.threads):
        for name in args.networks:
            model, points, acc, seconds = make_network(name, train, val, args.seed)
            saved["networks"][name] = {"validation_accuracy": acc, "train_seconds": seconds, "gate_points": points}
            print(f"{name}: {acc:.1%} on val, trained in {seconds:.0f} s", flush=True)
            epochs = args.resnet_epochs if name == "resnet18" else args.epochs
            for run in args.runs:
                done = [r for r in saved["rows"] if (r["network"], r["run"], r["epochs"], r["seed"], r["lr"])
                        == (name, run, epochs, args.seed, args.lr)]
                row = done[0] if done else evaluate(name, run, model, points, train, val, epochs, args.seed,
                                                    args.calibration_epochs, args.calibration_runs, args.lr)
                if not done:
                    saved["rows"].append(row)
                    out.write_text(json.dumps(saved, indent=1))
                rows.append(row)
                accs = {k: v["validation_accuracy"] for k, v in saved["networks"].items()}
                print(table([row], accs).splitlines()[-1], flush=True)
    print()
    print(table(rows, {k: v["validation_accuracy"] for k, v in saved["networks"].items()}))


if __name__ == "__main__":
    main()
