"""``semoe`` command line: one module per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys

from semoe.cli import convert, extract, generate, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semoe", description="Train and serve Mixture-of-Experts models (SE-MoE on PyTorch).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (train, generate, convert, extract):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = int(args.func(args, argv) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"semoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. TrainingDiverged, a failed data download
        print(f"semoe {args.command}: error: {e}", file=sys.stderr)
        return 1
    # a torchrun worker that trained: its process group goes before the interpreter does (an error above exits
    # without it: its peers may still be inside a collective, and torchrun stops them)
    from semoe.parallel.mesh import shutdown_distributed

    shutdown_distributed()
    return rc
