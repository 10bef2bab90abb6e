"""``nad gate-points``: a model's gate points (its preset, or ``--auto`` proposals), each with
its channels, units, layout and channel axis."""
from __future__ import annotations

from nad_ext.cli.common import add_model_args, add_units_arg, load_data, load_model


def add(sub) -> None:
    p = sub.add_parser("gate-points", help="list a model's gate points (its preset, or --auto proposals)")
    add_model_args(p)
    p.add_argument("--auto", action="store_true", help="propose gate points for an unknown network")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the model preset's)")
    add_units_arg(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from nad_ext import models
    from nad_ext.gates import describe_layout
    from nad_ext.training import build_gated_model

    train = load_data(args, "train")
    model = load_model(args, train, load_data(args, "val")) if args.weights or args.model in models.ZOO \
        else models.load_model(args.model, num_classes=len(train.classes))
    spec = models.get_spec(args.model)
    size = args.image_size or spec.input_size
    gated = build_gated_model(model, "auto" if args.auto else args.model, 1, size, model_id=args.model,
                              units=args.units)
    fmt = lambda values: "(" + ", ".join(f"{v:.3f}" for v in values) + ")"  # noqa: E731
    beta = f"{spec.beta:g}" if spec.beta is not None else "none tuned (pass --beta, or --beta auto to calibrate)"
    print(f"{args.model}: input {size}x{size}, normalisation mean {fmt(spec.mean)} std {fmt(spec.std)}, beta {beta}")
    for i, (p, shape) in enumerate(zip(gated.gate_points, gated.example_shapes)):
        relu = ", objective on relu(output)" if p.record == "relu" else ""
        print(f"{i:3d}  {p.name:44s} {p.channels:6d} {p.units:8s} {describe_layout(p, shape)} "
              f"{tuple(shape)[1:]}, axis {p.channel_axis}{relu}")
    print(f"{len(gated.gate_points)} gate points, {sum(gated.layer_sizes)} {args.units}")
