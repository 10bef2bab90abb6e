"""``nad prepare-data``: an ImageFolder tree decoded and resized once into a cache that
``--data`` reads (:func:`nad_ext.data.cache.prepare`), or ``--verify`` of such a cache."""
from __future__ import annotations

import sys


def add(sub) -> None:
    p = sub.add_parser("prepare-data", help="decode and resize an ImageFolder tree once into a cache that --data reads")
    p.add_argument("--data", help="the ImageFolder tree (train/ and val/) (default: none; required unless --verify)")
    p.add_argument("--out", help="the cache folder to write (default: none; required unless --verify)")
    p.add_argument("--image-size", type=int, help="the input size it is for (default: --model's, else 224)")
    p.add_argument("--model", help="take the input size of this model preset (default: none)")
    p.add_argument("--short-side", type=int, help="stored short side (default: the evaluation resize, 256 for 224)")
    p.add_argument("--format", choices=["raw", "jpeg"], default="raw",
                   help="raw uint8 pixels (default, fastest) or re-encoded JPEG (about 7x smaller)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for --format jpeg")
    p.add_argument("--on-bad-image", choices=["skip", "stop"], default="skip",
                   help="an unreadable image file is left out with a warning (skip) or stops with its path (stop)")
    p.add_argument("--workers", type=int, help="decoding threads (default: one per CPU core)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("--verify", metavar="CACHE",
                   help="check every image of CACHE against its checksum instead (default: none)")
    p.set_defaults(func=run)


def run(args) -> None:
    from nad_ext import models
    from nad_ext.data import cache

    if args.verify:
        bad = cache.verify(args.verify)
        for line in bad:
            print(line, file=sys.stderr)
        if bad:
            raise ValueError(f"{args.verify}: {len(bad)} damaged images; prepare the cache again")
        print(f"{args.verify}: every image matches its checksum")
        return
    if not args.data or not args.out:
        raise ValueError("prepare-data needs --data DIR and --out CACHE (or --verify CACHE)")
    size = args.image_size or (models.get_spec(args.model).input_size if args.model else 224)
    out = cache.prepare(args.data, args.out, size, short_side=args.short_side, encoding=args.format,
                        quality=args.quality, overwrite=args.overwrite, on_bad_image=args.on_bad_image,
                        workers=args.workers)
    prepared = cache.DataCache(out)
    counts = ", ".join(f"{s}: {m['count']} images" + (f" ({len(m['skipped'])} skipped)" if m["skipped"] else "")
                       for s, m in prepared.splits.items())
    print(f"cache for image size {size} (short side {prepared.settings['short_side']}, {args.format}): {out} "
          f"({counts})")
