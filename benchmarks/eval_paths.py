"""Per-image routing paths on the demo zoo (issue 26): how many steps and views per image?

For every zoo network of ``--networks`` and every (steps, views) of the grid it learns the path
of ``--per-class`` validation images of each class (drawn with ``--sample-seed``: the same
images in every run) with :func:`nad_ext.training.paths.learn_paths` (target "label", the
demo's beta, the other :class:`~nad_ext.training.paths.PathSettings` at their defaults), once
with each of two seeds, and measures:

- seconds per image: the wall time of ``learn_paths`` over the images (mean of the two seeds),
  on this machine and with its load (the ratios between grid points are what carry over);
- ``top1``: path-to-class top-1 agreement with the label
  (:func:`nad_ext.analysis.paths.path_to_class` against the network's class bank, learned once
  per network at the demo's settings, ``disentangle`` with ``DEMO_EPOCHS`` and ``DEMO_BETAS``,
  and cached in ``--out``), mean of the two seeds; chance 1 / classes;
- ``ok``: the share of images whose path is meaningful (status "ok"), mean of the two seeds;
- ``stability``: the mean over the images ok under both seeds of the IoU between the image's
  two binary paths (mean over gate points, 0/0 = 1, as in ``analysis.masks.similarity``);
- ``open``: the share of open channels of the paths (all gate points' channels together).

Each run's paths and time are cached in ``--out`` (a finished run is not repeated; the grid is
run from the cheapest point up, so a run cut short keeps the cheap points), the table is
printed as Markdown and the results go to ``--out/results.json``.

    nice python benchmarks/eval_paths.py --cache .nad_cache --out nad_output/eval_paths \\
        --networks zoo_residual zoo_plain --steps 5 10 20 --views 4 8 16 --threads 1
    nice python benchmarks/eval_paths.py ... --set init_std=0.1     # other PathSettings fields
    nice python benchmarks/eval_paths.py ... --only-cached          # the table of the points already run
    nice python benchmarks/eval_paths.py ... --set init_std=0.1 precision=bfloat16 --compare precision

``--set`` changes other :class:`PathSettings` fields for every point (in the cache's file names
and ``results_<field><value>.json``); ``--only-cached`` runs nothing new and writes the table of
the points found in ``--out`` to ``results[_...]_table.json``. ``--compare FIELD`` adds, per
row, how far that field moves the paths: the IoU of each image's path with the same seed's path
without the field (bfloat16 against float32, say).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from nad_ext import data, models
from nad_ext._utils.storage import atomic_write
from nad_ext.analysis.paths import path_to_class
from nad_ext.demo import DEMO_BETAS, DEMO_EPOCHS
from nad_ext.gates.maskbank import MaskBank
from nad_ext.gates.pathstore import PathChunk
from nad_ext.training import NADConfig, Network, disentangle
from nad_ext.training.paths import PathSettings, learn_paths

SEEDS = (0, 1)


def _value(text: str):
    """A ``--set`` value: a number where it reads as one (init_std=0.1), else the text (precision=bfloat16)."""
    try:
        return float(text)
    except ValueError:
        return text


def sample_indices(labels, per_class: int, seed: int) -> list[int]:
    """``per_class`` indices of each class, drawn without replacement by a generator seeded with
    ``seed``, in class order."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(labels))
    out = []
    for c in sorted(set(labels.tolist())):
        members = (labels == c).nonzero().flatten()
        out += members[torch.randperm(len(members), generator=gen)[:per_class]].sort().values.tolist()
    return out


def indices_key(indices) -> str:
    """A short fingerprint of the images (the cache's file names)."""
    import hashlib

    return hashlib.sha1(",".join(map(str, indices)).encode()).hexdigest()[:8]


def class_bank(name: str, model, train, out_dir: Path) -> tuple[MaskBank, float]:
    """The network's class bank at the demo's settings, learned once and cached in ``out_dir``."""
    path = out_dir / f"{name}_bank.safetensors"
    if path.is_file():
        return MaskBank.load(path), float(json.loads((out_dir / f"{name}_bank.json").read_text())["seconds"])
    spec = models.get_spec(name)
    config = NADConfig(beta=DEMO_BETAS[name], epochs=DEMO_EPOCHS, image_size=spec.input_size,
                       tasks_per_step=len(train.classes), device="cpu", keep_every_epoch=False)
    start = time.perf_counter()
    bank = disentangle(Network(model, name, name), train, config=config, progress=False)
    seconds = time.perf_counter() - start
    bank.save(path)
    (out_dir / f"{name}_bank.json").write_text(json.dumps({"seconds": seconds, "beta": DEMO_BETAS[name],
                                                           "epochs": DEMO_EPOCHS}))
    return bank, seconds


def cache_path(out_dir: Path, name: str, indices, steps: int, views: int, seed: int, images_per_step: int,
               extra: dict) -> Path:
    """Where the paths of one run are cached."""
    return out_dir / (f"{name}_n{len(indices)}_{indices_key(indices)}_s{steps}_v{views}_ips{images_per_step}"
                      + settings_key(extra) + f"_seed{seed}.pt")


def settings_key(extra: dict) -> str:
    """``extra`` (the ``--set`` fields) in file names: "_init_std0.1_precisionbfloat16"."""
    return "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}" for k, v in sorted(extra.items()))


def run_paths(name: str, model, val, indices, steps: int, views: int, seed: int, images_per_step: int,
              out_dir: Path, extra: dict | None = None) -> tuple[PathChunk, float, list[str]]:
    """The paths of one (network, steps, views, seed, other settings ``extra``), cached in
    ``out_dir``; their wall seconds and the warnings learn_paths gave."""
    extra = extra or {}
    path = cache_path(out_dir, name, indices, steps, views, seed, images_per_step, extra)
    if path.is_file():
        saved = torch.load(path)
        return PathChunk(*saved["chunk"]), saved["seconds"], saved["warnings"]
    settings = PathSettings(steps=steps, views=views, images_per_step=images_per_step, seed=seed,
                            beta=DEMO_BETAS[name], device="cpu", **extra)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chunk = learn_paths(Network(model, name, name), val, indices=indices, settings=settings, progress=False)
    seconds = time.perf_counter() - start
    notes = [str(w.message) for w in caught]
    fields = [chunk.image_index, chunk.label, chunk.target, chunk.prediction, chunk.status, chunk.logits]
    atomic_write(path, lambda tmp: torch.save({"chunk": fields, "seconds": seconds, "warnings": notes}, tmp))
    return chunk, seconds, notes


def pair_iou(a: PathChunk, b: PathChunk) -> tuple[float, int]:
    """Mean over the images ok in both of the IoU of their two binary paths (mean over gate
    points, 0/0 = 1), and how many images that is."""
    assert torch.equal(a.image_index, b.image_index)
    both = (a.status == 0) & (b.status == 0)
    if not both.any():
        return float("nan"), 0
    per_point = []
    for x, y in zip(a.masks(), b.masks()):
        x, y = x[both], y[both]
        inter, union = (x & y).sum(1).double(), (x | y).sum(1).double()
        per_point.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)))
    return float(torch.stack(per_point).mean(0).mean()), int(both.sum())


def evaluate(name, model, accuracy, bank, val, indices, steps, views, images_per_step, out_dir,
             extra: dict | None = None, compare: str | None = None) -> dict:
    """One grid point's row; with ``compare`` (a field of ``extra``) also, per seed, the IoU of
    each image's path with its path under the same seed without that field (its default)."""
    extra = extra or {}
    chunks, seconds, top1, top1_pred, ok, opened, notes = [], [], [], [], [], [], []
    for seed in SEEDS:
        chunk, s, w = run_paths(name, model, val, indices, steps, views, seed, images_per_step, out_dir, extra)
        chunks.append(chunk)
        seconds.append(s)
        notes += w
        ok.append(float((chunk.status == 0).double().mean()))
        agreement = path_to_class(chunk, bank, permutations=0, per_image=False)
        top1.append(agreement["top1_label"])
        top1_pred.append(agreement["top1_prediction"])
        keep = chunk.status == 0
        opened.append(float(sum(m[keep].sum() for m in chunk.masks()) / (int(keep.sum()) * sum(bank.layer_sizes))))
    stability, both = pair_iou(*chunks)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    against = {}
    if compare:
        base = {k: v for k, v in extra.items() if k != compare}
        per_seed = [pair_iou(chunk, run_paths(name, model, val, indices, steps, views, seed, images_per_step,
                                              out_dir, base)[0])[0] for seed, chunk in zip(SEEDS, chunks)]
        against = {"compare": compare, "iou_vs_default": mean(per_seed), "iou_vs_default_per_seed": per_seed}
    return {"network": name, "validation_accuracy": accuracy, "steps": steps, "views": views,
            "images_per_step": images_per_step, "settings": extra, "images": len(indices), "seeds": list(SEEDS),
            "beta": DEMO_BETAS[name], "seconds_per_image": mean(seconds) / len(indices),
            "seconds_per_image_per_seed": [s / len(indices) for s in seconds],
            "top1_label": mean(top1), "top1_label_per_seed": top1, "top1_prediction": mean(top1_pred),
            "chance": 1.0 / len(bank.tasks), "ok_share": mean(ok), "ok_share_per_seed": ok,
            "stability_iou": stability, "stability_images": both, "open_share": mean(opened),
            "warnings": sorted(set(notes)), **against}


def table(rows: list[dict]) -> str:
    lines = ["| network | settings | steps | views | s / image | top-1 path-to-class = label (chance) | ok share | "
             "stability (IoU, 2 seeds) | open channels |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in sorted((r.get("settings") or {}).items())) or "defaults"
        lines.append(f"| {r['network']} | {settings} | {r['steps']} | {r['views']} | {r['seconds_per_image']:.3f} | "
                     f"{r['top1_label']:.1%} ({r['chance']:.0%}) | {r['ok_share']:.0%} | "
                     f"{r['stability_iou']:.3f} | {r['open_share']:.1%} |"
                     + (f" IoU with {r['compare']}'s default, same seed: {r['iou_vs_default']:.3f} |"
                        if "compare" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=".nad_cache", help="the zoo's cache folder")
    parser.add_argument("--out", default="nad_output/eval_paths", help="class banks, paths and results.json")
    parser.add_argument("--networks", nargs="+", default=["zoo_residual", "zoo_plain"])
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--views", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--per-class", type=int, default=10, help="validation images per class")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the draw of the images")
    parser.add_argument("--images-per-step", type=int, default=PathSettings.images_per_step)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="other PathSettings fields, e.g. lr=1 init_std=0.1 precision=bfloat16")
    parser.add_argument("--compare", metavar="FIELD", help="a field of --set: also the IoU of each path with "
                        "the same seed's path at that field's default (run or cached)")
    parser.add_argument("--only-cached", action="store_true",
                        help="tabulate the grid points already run (in --out), run nothing new")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: PyTorch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = data.generated_shapes("train"), data.generated_shapes("val")
    zoo = models.load_zoo(args.cache, train, val, names=args.networks, progress=False)
    indices = sample_indices(val.labels, args.per_class, args.sample_seed)
    extra = {k: _value(v) for k, v in (a.split("=", 1) for a in args.set)}
    grid = sorted(((s, v) for s in args.steps for v in args.views), key=lambda sv: (sv[0] * sv[1], sv))
    rows, banks = [], {}
    for name in args.networks:
        model, accuracy = zoo[name]
        bank, seconds = class_bank(name, model, train, out_dir)
        open_share = float(sum((m > 0).sum() for m in bank.logits) / (len(bank.tasks) * sum(bank.layer_sizes)))
        banks[name] = {"seconds": seconds, "beta": DEMO_BETAS[name], "epochs": DEMO_EPOCHS, "open_share": open_share}
        print(f"{name}: validation accuracy {accuracy:.1%}; class bank ({len(bank.tasks)} tasks, {open_share:.1%} of "
              f"channels open) in {seconds:.0f} s",
              flush=True)
        for steps, views in grid:
            if args.only_cached and not all(cache_path(out_dir, name, indices, steps, views, seed, args.images_per_step,
                                                       extra).is_file() for seed in SEEDS):
                continue
            rows.append(evaluate(name, model, accuracy, bank, val, indices, steps, views, args.images_per_step,
                                 out_dir, extra, args.compare))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            payload = json.dumps({"argv": vars(args), "threads": torch.get_num_threads(), "banks": banks,
                                  "image_indices": indices, "rows": rows}, indent=1)
            atomic_write(out_dir / f"results{settings_key(extra)}"
                                   f"{'_table' if args.only_cached else ''}.json", lambda tmp: Path(tmp).write_text(payload))
    rows.sort(key=lambda r: (args.networks.index(r["network"]), r["steps"], r["views"]))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
