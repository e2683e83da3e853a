"""The `tokaccel` command: demo | eval | bench | calibrate | plot | policies."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand providers: each module has `add_commands(subparsers)`; a command stores its handler
# in `func`. Imported only when the CLI runs, so `import tokaccel` stays light.
COMMAND_MODULES = ("tokaccel.demo", "tokaccel.evals.cli", "tokaccel.bench.cli", "tokaccel.calibrate")


def _plot(args) -> int:
    """Plots for whatever results a folder holds (eval result folders and/or bench CSVs)."""
    written = []
    for module_name in ("tokaccel.evals.plots", "tokaccel.bench.plots"):
        module = importlib.import_module(module_name)
        written += module.plot_results(args.path, out_dir=args.out)
    if not written:
        print(f"no eval results or benchmark CSVs found under {args.path}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _list_policies(args) -> int:
    import tokaccel

    for name, description in tokaccel.policies().items():
        print(f"{name:14s} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokaccel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    plot = sub.add_parser("plot", help="draw plots (PNG) from eval result folders and/or benchmark CSVs")
    plot.add_argument("path", help="results folder")
    plot.add_argument("--out", default=None, help="where to write PNGs (default: PATH/plots)")
    plot.set_defaults(func=_plot)
    sub.add_parser("policies", help="list the registered policies").set_defaults(func=_list_policies)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
