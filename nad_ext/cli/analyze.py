"""``nad analyze``: the paper's analyses on a mask bank (:func:`nad_ext.analysis.run_all`);
under torchrun the batches are shared among the processes."""
from __future__ import annotations

from pathlib import Path

from nad_ext.cli.common import add_model_args, add_pipeline_args, load_data, load_model, setup


def add(sub) -> None:
    p = sub.add_parser("analyze", help="run the paper's analyses on a mask bank")
    add_model_args(p)
    p.add_argument("--bank", required=True, help="mask bank written by `nad disentangle` (masks.safetensors)")
    p.add_argument("--out", required=True, help="output folder (results.json, similarity CSVs, examples)")
    p.add_argument("--mosaics", type=int, default=100, help="mosaics for the hit rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the mosaics and the null baseline")
    p.add_argument("--image-size", type=int, default=None,
                   help="evaluation size (default: the bank's training size, else the model preset's)")
    add_pipeline_args(p, bad_images=False)
    p.set_defaults(func=run)


def run(args) -> None:
    from nad_ext import analysis, models
    from nad_ext.data import pipeline
    from nad_ext.gates import MaskBank
    from nad_ext.training import build_gated_model

    bank = MaskBank.load(args.bank)
    if bank.model_id != args.model:  # before its gate points are looked up in the wrong network
        raise ValueError(f"mask bank does not match the model: {args.bank} is for model {bank.model_id!r}, "
                         f"not {args.model!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; expected a folder for the analyses (results.json, CSVs)")
    train, val = load_data(args, "train"), load_data(args, "val")
    model = load_model(args, train, val)  # checks too that train/ and val/ have the same classes
    beyond = sorted({c for t in bank.tasks for c in t.classes if c >= len(val.classes)})
    if beyond:
        raise ValueError(f"--bank {args.bank} does not fit --data {args.data}: its tasks use class index {beyond[-1]}, "
                         f"the data has {len(val.classes)} classes")
    size = args.image_size or bank.config.get("image_size") or models.get_spec(args.model).input_size
    ctx = setup(args)
    try:  # the gate points are the bank's: a bank of other shapes fails here
        gated = build_gated_model(model, bank.gate_points, len(bank.tasks), size, model_id=args.model,
                                  device=ctx.device)
    except ValueError as err:
        raise ValueError(f"mask bank does not match the model: {args.bank} does not fit --model {args.model}: "
                         f"{err}") from None
    # The analyses' batches come from this loader, on the analyses' device.
    with pipeline.make_loader(val, size, ctx.device, args.data_pipeline or "auto") as loader:
        analysis.run_all(gated, bank, pipeline.with_loader(val, loader), size, args.out, num_mosaics=args.mosaics,
                         seed=args.seed, device=str(ctx.device), map_units=ctx.map_units, write=ctx.rank == 0,
                         progress=ctx.rank == 0)
    if ctx.rank == 0:
        print(f"analyses written to {args.out}")
