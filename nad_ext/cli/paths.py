"""``nad paths``: the routing path of each image of a split (or of a list of its images) into a
path store (:func:`nad_ext.training.paths.learn_paths`)."""
from __future__ import annotations

import os
from pathlib import Path

from nad_ext.cli.common import (add_execution_args, add_model_args, add_pipeline_args, add_selective_args, add_units_arg,
                                config_from_args, load_data, load_model, network_from_args)


def add(sub) -> None:
    # Defaults are PathSettings', written out so that --help shows them without importing torch;
    # python_tests/test_paths.py checks that they agree.
    p = sub.add_parser("paths", help="per-image routing paths: one task per image, trained on augmented views of "
                                     "that image; writes a path store")
    add_model_args(p)
    p.add_argument("--split", default="val", help="the split of --data whose images get paths (train or val)")
    p.add_argument("--images", metavar="FILE",
                   help="text file listing the images to train, one a line: indices into the split, or image files "
                        "(absolute, or relative to the split folder); blank lines and lines starting with # are "
                        "skipped (default: every image of the split)")
    p.add_argument("--only", choices=["misclassified", "correct"],
                   help="train only those images (of --images, or of the split) that the original network "
                        "misclassifies, or gets right, on their evaluation view (default: all of them)")
    p.add_argument("--out", required=True, help="output folder: the path store (manifest.json and shards)")
    p.add_argument("--target", choices=["label", "prediction"], default="label",
                   help="the class each path keeps: the image's label (images the network gets wrong then have no "
                        "path), or the original network's prediction on the image (CDRP's choice)")
    p.add_argument("--steps", type=int, default=20, help="training steps per image")
    p.add_argument("--views", type=int, default=4, help="augmented views (crop and flip) of the image per step")
    p.add_argument("--images-per-step", type=int, default=64, help="images trained together in one step")
    p.add_argument("--chunk-size", type=int, default=1024, help="images whose gates are in memory together")
    p.add_argument("--gate-points", help="as for disentangle (default: the model's preset)")
    add_units_arg(p)
    p.add_argument("--beta", type=float, help="sparsity weight (default: the model preset's; required for models "
                                              "without one, e.g. the value a disentangle run used)")
    p.add_argument("--lr", type=float, default=0.1, help="step size of the normalised-gradient update")
    p.add_argument("--seed", type=int, default=0, help="seed of the gates' initialisation and the views")
    p.add_argument("--init-std", type=float, default=0.01,
                   help="standard deviation of the initial gate logits: near 0, so that the first steps set each "
                        "channel's sign (the class runs' 1.0 leaves a few steps' paths near their random start)")
    p.add_argument("--image-size", type=int, help="training crop size (default: the model preset's input size)")
    add_selective_args(p, "each image's views", "a path")
    add_execution_args(p)
    add_pipeline_args(p, bad_images=False)
    p.add_argument("--on-nonfinite", choices=["stop", "skip"], default="stop",
                   help="a NaN or Inf in an image's gate gradient stops the command, naming the image (stop), or "
                        "skips that step and gives the image status 'nonfinite' (skip)")
    p.add_argument("--keep-logits", action="store_true",
                   help="store the gate logits (float16) besides the binary paths")
    p.add_argument("--resume", action="store_true",
                   help="continue the path store in --out (made with the same settings): its images are skipped")
    p.add_argument("--overwrite", action="store_true", help="replace the path store in --out")
    p.set_defaults(func=run)


def settings_from_args(args):
    """The :class:`~nad_ext.training.paths.PathSettings` of the parsed arguments."""
    from nad_ext.training.paths import PathSettings

    return config_from_args(args, PathSettings)


def read_image_list(path: str, images) -> list[int]:
    """--images: the indices into ``images`` that the file lists (indices or image files)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read --images {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--images {path} is not a text file; expected one image index or file a line") from None
    entries = [(n, line.strip()) for n, line in enumerate(lines, 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise ValueError(f"--images {path} lists no images")
    files = None
    out = []
    for n, entry in entries:
        if entry.isdigit():
            out.append(int(entry))
            continue
        if images.paths is None:
            raise ValueError(f"--images {path} line {n}: {entry!r} is not an image index (the built-in data's images "
                             "have no files)")
        if files is None:
            files = {p.resolve(): i for i, p in enumerate(images.paths)}
        candidate = Path(entry) if Path(entry).is_absolute() else Path(images.name) / entry
        index = files.get(candidate.resolve(), files.get(Path(entry).resolve()))
        if index is None:
            raise ValueError(f"--images {path} line {n}: {entry!r} is no image of {images.name}")
        out.append(index)
    return out


def run(args) -> None:
    from collections import Counter

    from nad_ext.gates.pathstore import STATUS
    from nad_ext.training.paths import learn_paths, select_images

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("nad paths runs in one process; start it without torchrun")
    if args.resume and args.overwrite:
        raise ValueError("pass --resume or --overwrite, not both")
    settings = settings_from_args(args)
    settings.validate()  # before data and model load
    train, val = load_data(args, "train"), load_data(args, "val")
    if args.split not in ("train", "val"):
        images = load_data(args, args.split)
    else:
        images = train if args.split == "train" else val
    network = network_from_args(args, load_model(args, train, val))
    indices = read_image_list(args.images, images) if args.images else None
    if args.only:
        before = len(indices) if indices is not None else len(images)
        indices = select_images(network, images, args.only, indices=indices, image_size=settings.image_size,
                                device=settings.device, data_pipeline=settings.data_pipeline)
        print(f"{len(indices)} of {before} images are {args.only}")
        if not indices:
            return
    print(f"paths of {len(indices) if indices is not None else len(images)} images of {images.name} "
          f"(target {settings.target}, {settings.steps} steps x {settings.views} views)")
    paths = learn_paths(network, images, indices=indices, settings=settings, out=args.out,
                        keep_logits=args.keep_logits, overwrite=args.overwrite, resume=args.resume)
    counts = Counter(STATUS[s] for s in paths.status.tolist())
    detail = ", ".join(f"{counts[name]} {name}" for name in STATUS.values() if counts[name])
    print(f"{len(paths)} paths ({detail or 'none new'}): {args.out}")
