"""``nad demo``: the whole method on the built-in shapes data (:func:`nad_ext.demo.run_demo`)."""
from __future__ import annotations


def add(sub) -> None:
    # Defaults are the demo's, written out so that --help shows them without importing torch;
    # python_tests/test_cli.py checks that they agree.
    p = sub.add_parser("demo", help="train the built-in zoo, disentangle every class, write the report",
                       description="The whole method on the built-in shapes data: trains (or loads) one small "
                                   "network per connection type, disentangles every class, runs the analyses and "
                                   "writes the report.")
    p.add_argument("--out", default="nad_output/demo", help="output folder (mask banks, analyses, report.html)")
    p.add_argument("--cache", default=".nad_cache", help="where the zoo's trained weights are cached")
    p.add_argument("--epochs", type=int, default=8, help="NAD epochs")
    p.add_argument("--mosaics", type=int, default=40, help="mosaics for the hit rate")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ..., or auto: cuda when available")
    p.add_argument("--selective", action="store_true",
                   help="learn with the selective objective (not the paper's; its settings tuned on this zoo, "
                        "see `nad disentangle --help`): sub-architectures that also reject other classes")
    p.add_argument("--paths", action="store_true",
                   help="also learn the routing path of every validation image on each CNN (one task per image) "
                        "and compare each with the gates learnt for every class: path to class, misclassified "
                        "images, each gate point, and a detector of paths far from every class on images attacked "
                        "by FGSM (writes paths.json, adds a report section)")
    p.set_defaults(func=run)


def run(args) -> None:
    from nad_ext.demo import run_demo

    run_demo(args.out, cache_dir=args.cache, epochs=args.epochs, num_mosaics=args.mosaics, device=args.device,
             selective=args.selective, paths=args.paths)
