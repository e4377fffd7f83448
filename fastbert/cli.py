"""The ``fastbert`` command. Each subcommand lives in its own module, imported only when run."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "bench": ("fastbert.benchmarks.cli", "run the benchmark suite (kernels vs eager PyTorch, model vs HF and torch.compile)"),
    "pretrain": ("fastbert.training.cli", "pre-train BERT with masked LM and next sentence prediction"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastbert", description="a faster BERT for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            modules[name] = importlib.import_module(module)
        except ImportError as exc:
            p.set_defaults(_missing=f"fastbert {name} is unavailable: {exc}")
            continue
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
