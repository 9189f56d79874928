"""The `usfmae` command: one subcommand per step of the study.

Each subcommand lives in the module of its step, which registers it with `add_cli(subparsers)`
and calls the same functions the notebooks call. Only the chosen step's module is imported,
so `usfmae run` does not pay for importing torch. A new step adds one line to COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from usfmae_lib import UsfmaeError, __version__

# subcommand -> (module that registers it, one-line help shown by `usfmae --help`)
COMMANDS = {
    "run": ("usfmae_lib.runner", "execute one notebook headlessly with papermill"),
    "reproduce": ("usfmae_lib.runner", "run every notebook in order for a profile and write index.md"),
    "synth": ("usfmae_lib.synthetic", "write the synthetic ultrasound tree (pretraining, annotated, eval sets)"),
    "data": ("usfmae_lib.curation_check", "check data roots before curating: datasets found, files, frames, eval splits"),
    "curate": ("usfmae_lib.curation", "read dataset roots into one deduplicated, leakage-audited frame manifest"),
    "clean": ("usfmae_lib.preprocess", "remove burned-in annotations and write the 224 px PNG tree"),
    "pretrain": ("usfmae_lib.pretrain", "pretrain the masked autoencoder (single process or torchrun DDP)"),
    "finetune": ("usfmae_lib.finetune", "fine-tune and evaluate one model on one dataset (one cell of Table 2)"),
    "teaching-mae": ("usfmae_lib.teaching", "regenerate the small MAE that ships for teaching (notebooks 03, 04)"),
    "bench": ("usfmae_lib.bench", "measure images/s, TFLOP/s and MFU of a step on this machine"),
    "check": ("usfmae_lib.gpu_check", "prove this machine runs the study: usfmae check gpu (--dry: the same paths, shrunk)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usfmae",
        description="USF-MAE study: curate, clean, pretrain, inspect, fine-tune, report.",
    )
    parser.add_argument("--version", action="version", version=f"usfmae {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).add_cli(subparsers)
    else:  # listing only: name every command without importing any step
        for name, (_, help_text) in COMMANDS.items():
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def user_error(err: BaseException) -> str | None:
    """The message for an error the user can fix (a UsfmaeError, a full disk or quota), or None."""
    import errno

    if isinstance(err, UsfmaeError):
        return str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f"writing {err.filename}" if err.filename else "while writing"
        return (f"no space left on the device {where} ({err.strerror}); free space (or raise the quota) and run "
                "the same command again")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsfmaeError, OSError) as err:
        message = user_error(err)
        if message is None:  # any other error is a bug: keep its traceback
            raise
        print(f"usfmae {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"usfmae {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
