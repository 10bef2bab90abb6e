"""A study of per-image routing paths (issue 26): the path of every image of a set, and of an
attacked copy of it, against the class sub-architectures of a mask bank, each analysis with its
chance baseline (:func:`analyze_paths`; ``nad demo --paths`` runs it on the zoo).

It learns paths (:mod:`nad_ext.training.paths`) and analyses them (:mod:`nad_ext.analysis.paths`),
so it stands after both, beside the report. May import everything before it; not
:mod:`nad_ext.report`, :mod:`nad_ext.demo`, :mod:`nad_ext.cli`.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from nad_ext import analysis, data
from nad_ext.data.transforms import eval_transform
from nad_ext.distributed import resolve_device
from nad_ext.gates.pathstore import STATUS, PathChunk
from nad_ext.training import Network, PathSettings, PathWarning, learn_paths

ATTACKS = ("fgsm", "pgd")
PGD_STEPS = 10  # attack="pgd": steps of eps / 4
ATTACK_BATCH = 64  # images per gradient of the attack


def analyze_paths(network: Network, bank, val, *, settings: PathSettings, attack: str = "fgsm",
                  eps: float = 8 / 255, seed: int = 0, progress: bool = True) -> dict:
    """Per-image routing paths of every image of ``val`` against the class sub-architectures of
    ``bank`` (one task per class), each analysis with its chance baseline; a JSON-friendly dict.

    Every path is trained with ``settings`` and target "prediction" (CDRP's choice, whatever
    ``settings.target`` says): under "label" an image that the network misclassifies on every
    view gets no path (status "misclassified"), so (b) would have nothing to measure and the
    detector would lose exactly the attacks that succeed. Agreement with the label is still
    measured in (a). On the clean paths: (a) ``path_to_class`` (top-1 / top-k agreement with the
    label and the prediction, chance and permuted baselines), (b) ``misclassified`` (the share of
    misclassified images whose path is closer to the predicted class than to their own, chance
    0.5), (c) ``layerwise`` (per gate point, top-1 agreement with the label against 1 / T).

    (d) ``attack`` and ``detector``: every image is attacked (:func:`write_attacked`) with
    ``attack`` ("fgsm", or "pgd": ``PGD_STEPS`` steps of eps / 4) against the frozen original
    network and the image's label, ``eps`` (L-infinity) in the pixels [0, 1] of the image itself,
    and written as a PNG file into an ImageFolder tree in a temporary folder, so that the attacked
    images go through the same loader and augmentation as the clean ones;
    ``attack["accuracy_attacked"]`` is the original network's accuracy on the files as read
    back. Their paths are learnt with the same settings, and the outlier score (1 - the highest
    similarity to a class sub-architecture) separates attacked from clean paths with a ROC AUC
    (chance 0.5), also split into attacked images whose prediction the attack flipped and those
    it did not. ``attacked_path_to_class``: (a) on the attacked paths.

    Images without a meaningful path (status other than "ok") are left out and counted in
    ``status``: with target "prediction" that is an image none of whose views the network
    answers as on its evaluation view, which an attack that does not survive the augmentation
    makes more frequent (the attacked images' count is the one to read). ``seed``: the
    analyses' draws (permutation baselines, (b)'s random other class); the paths' own seed is
    ``settings.seed``. ``seconds``: the time of each part; ``notes``: the paths' warnings.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(map(repr, ATTACKS))}, got {attack!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps <= 1:
        raise ValueError(f"eps must be a number in [0, 1] (pixel space), got {eps!r}")
    settings = dataclasses.replace(settings, target="prediction")
    config = settings.nad_config(network.model_id)
    times, notes = {}, []
    tick = time.perf_counter()
    clean = _learn(network, val, settings, progress, notes)
    times["clean_paths"] = time.perf_counter() - tick
    tick = time.perf_counter()
    sim = analysis.path_class_similarity(clean.masks(), bank)
    out = {"images": len(val), "settings": {**dataclasses.asdict(settings), "beta": config.beta,
                                            "image_size": config.image_size},
           "path_to_class": analysis.path_to_class(clean, bank, per_image=False, seed=seed, similarity=sim),
           "misclassified": analysis.misclassified_paths(clean, bank, seed=seed, similarity=sim),
           "layerwise": analysis.layerwise_path_to_class(clean, bank)}
    times["analyses"] = time.perf_counter() - tick
    with tempfile.TemporaryDirectory(prefix="nad-attacked-") as tmp:
        tick = time.perf_counter()
        attacked_set = write_attacked(network.model, val, Path(tmp), config.image_size, attack, eps, config.device)
        times["attack"] = time.perf_counter() - tick
        tick = time.perf_counter()
        attacked = _learn(network, attacked_set, settings, progress, notes)
        times["attacked_paths"] = time.perf_counter() - tick
    tick = time.perf_counter()
    label, before, after = clean.label, clean.prediction, attacked.prediction
    flipped = after != before
    out["attack"] = {"method": attack, "eps": eps, "space": "pixels [0, 1], L-infinity", "steps": 1 if attack == "fgsm"
                     else PGD_STEPS, "images": len(val), "accuracy_clean": float((before == label).double().mean()),
                     "accuracy_attacked": float((after == label).double().mean()),
                     "flipped": int(flipped.sum()), "flipped_share": float(flipped.double().mean())}
    ok = lambda chunk: chunk.status == 0  # noqa: E731
    attacked_sim = analysis.path_class_similarity(attacked.masks(), bank)
    out["attacked_path_to_class"] = (analysis.path_to_class(attacked, bank, per_image=False, seed=seed,
                                                            similarity=attacked_sim)
                                     if ok(attacked).any() else None)
    clean_scores = analysis.path_outlier_scores(clean.masks(), bank, similarity=sim)[ok(clean)]
    attacked_scores = analysis.path_outlier_scores(attacked.masks(), bank, similarity=attacked_sim)
    detector = {}
    for name, rows in (("all", ok(attacked)), ("flipped", ok(attacked) & flipped),
                       ("not_flipped", ok(attacked) & ~flipped)):
        detector[name] = (analysis.detector_auc(clean_scores, attacked_scores[rows])
                          if rows.any() and len(clean_scores) else None)
    out["detector"] = detector
    out["status"] = {what: {STATUS[k]: int((chunk.status == k).sum()) for k in STATUS}
                     for what, chunk in (("clean", clean), ("attacked", attacked))}
    times["analyses"] += time.perf_counter() - tick
    out["seconds"] = times
    out["notes"] = notes
    return out


def write_attacked(model, images, folder: Path, size: int, attack: str, eps: float, device="cpu"):
    """Attacks every image of ``images`` against the frozen ``model`` (x -> logits) and the
    image's label, and writes it as a PNG file into the ImageFolder tree
    ``folder/attacked/<class number>/<image index>.png``; returns the files as an ImageSet in the
    order of ``images``, with its classes and labels.

    The attack's space is the image's own pixels in [0, 1] (``eps`` there, L-infinity; the
    gradient goes through the evaluation transform at ``size``, differentiable on float
    images, and its normalisation), so what is written is the attacked image itself, not a
    resampled view of it. Rounding to uint8 for the file weakens the attack slightly."""
    device = resolve_device(device)
    model = model.to(device).eval()
    net = lambda pixels: model(eval_transform(pixels * 255.0, size))  # noqa: E731
    root = folder / "attacked"
    width = len(str(len(images.classes) - 1))
    dirs = [root / f"{c:0{width}d}" for c in range(len(images.classes))]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    digits = len(str(len(images) - 1))
    for lo in range(0, len(images), ATTACK_BATCH):  # each image read once; a batch per image shape
        loaded = {i: images.load(i) for i in range(lo, min(lo + ATTACK_BATCH, len(images)))}
        by_shape: dict[tuple, list[int]] = {}
        for i, image in loaded.items():
            by_shape.setdefault(tuple(image.shape), []).append(i)
        for block in by_shape.values():
            x = torch.stack([loaded[i] for i in block]).to(device).float() / 255.0
            y = torch.tensor([images.labels[i] for i in block], device=device)
            if attack == "fgsm":
                adv = analysis.fgsm(net, x, y, eps)
            else:
                adv = analysis.pgd(net, x, y, eps, eps / 4, PGD_STEPS)
            # Kept in [0, 1], then rounded to uint8 for the file: up to half a grey level off the
            # attack's step, which weakens it slightly (the accuracy is measured on the files).
            pixels = (adv.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for i, array in zip(block, pixels):
                Image.fromarray(array).save(dirs[images.labels[i]] / f"{i:0{digits}d}.png")
    files = [dirs[images.labels[i]] / f"{i:0{digits}d}.png" for i in range(len(images))]
    return data.ImageSet(images.classes, images.labels, f"{images.name}-{attack}-eps{eps:.4g}", paths=files)


def _learn(network, images, settings, progress, notes) -> PathChunk:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PathWarning)
        chunk = learn_paths(network, images, settings=settings, progress=progress)
    notes += [str(w.message) for w in caught if issubclass(w.category, PathWarning)]
    return chunk
