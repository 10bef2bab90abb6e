"""The ``nad`` command line: each verb is one call of the Python API plus argument parsing and
printing, in a module of its own here (``add(sub)`` adds its parser, ``run(args)`` runs it);
:mod:`~nad_ext.cli.common` holds what they share. ``nad <verb> --help`` lists a verb's options.
``python -m nad_ext`` is the same command; under torchrun (``torchrun --nproc-per-node=N -m
nad_ext disentangle ...``) ``disentangle`` and ``analyze`` share their work among the processes
(:mod:`nad_ext.distributed`).

Nothing heavy is imported before the arguments are parsed (torch takes seconds to load), so
``--help``, ``--version`` and argument errors answer at once; each verb imports what it uses.

Exit status: 0 done; 2 a user error (bad arguments, a missing or invalid file, an unknown
model, a run that would be overwritten, a full disk, a run folder in use, another torchrun
process's failure), reported as one ``error:`` line; 130 interrupted; 1 anything else (a bug:
the traceback is shown).

May import: everything (the command line comes last).
"""
from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

import nad_ext
from nad_ext import __version__, distributed
from nad_ext.cli import analyze, calibrate, demo, disentangle, gate_points, paths, prepare_data, report, similarity
from nad_ext.cli.common import USER_ERROR, Parser

# The verbs, in the order `nad --help` lists them.
VERBS = (demo, gate_points, disentangle, calibrate, paths, analyze, prepare_data, report, similarity)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nad", description="Neural Architecture Disentanglement: per-task sub-architectures of "
                                            "a pretrained CNN (Hu et al., ICCV 2021)",
                    epilog="exit status: 0 done, 2 user error (bad arguments or input files), 130 interrupted, "
                           "1 unexpected error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="<verb>")
    for verb in VERBS:
        verb.add(sub)
    return parser


def _note(show, message, category, filename, lineno, file=None, line=None) -> None:
    """nad-ext's warnings (a bank without checksums, ...) as one line; others by ``show``."""
    if Path(filename).resolve().is_relative_to(Path(nad_ext.__file__).resolve().parent):
        print(f"note: {message}", file=sys.stderr)
    else:
        show(message, category, filename, lineno, file, line)


def _is_user_error(err: RuntimeError) -> bool:
    """A run folder in use, or another torchrun process's failure."""
    from nad_ext.training.rundir import RunLockedError  # loaded already when it raised this

    return isinstance(err, (RunLockedError, distributed.PeerError))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(_note, shown)
    try:
        if getattr(args, "model", None) is not None:  # an unknown name first, before any other complaint
            from nad_ext import models

            models.get_spec(args.model)
        args.func(args)
    except (ValueError, OSError, RuntimeError) as err:
        # OSError: missing, unreadable or unwritable files (a full disk); RuntimeError: only ours
        # (a run folder in use, another torchrun process failed) count as user errors.
        if isinstance(err, RuntimeError) and not _is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        distributed.record_error(err)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted" + (" (continue with --resume)" if getattr(args, "verb", "") == "disentangle" else ""),
              file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
