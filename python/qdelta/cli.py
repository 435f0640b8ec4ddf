"""The ``qdelta`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from qdelta.demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed)
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from qdelta.zoo import main as zoo_main

    return zoo_main(
        (["--tiny"] if args.tiny else [])
        + ["--seed", str(args.seed)]
        + (["--cache", args.cache] if args.cache else [])
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdelta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demonstration")
    demo.add_argument("--out", default="results", help="directory for results (default: results)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    zoo = sub.add_parser("zoo", help="build (or find cached) the offline model zoo")
    zoo.add_argument("--tiny", action="store_true", help="the CI-sized configuration")
    zoo.add_argument("--seed", type=int, default=0)
    zoo.add_argument("--cache", default=None, help="cache directory (default ~/.cache/qdelta/zoo)")
    zoo.set_defaults(func=_cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
