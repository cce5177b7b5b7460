"""The dlfast command line: `python -m dlfast info | bench | train`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, built CUDA archs, which backends work")
    bench = sub.add_parser("bench", help="benchmark dlfast ops against their peers")
    from dlfast.bench.runner import add_arguments

    add_arguments(bench)
    train = sub.add_parser("train", help="train a course model on real data (short recipe)")
    from dlfast import train as train_recipes

    train_recipes.add_arguments(train)
    args = parser.parse_args(argv)
    if args.command == "info":
        from dlfast.info import format_info, info

        print(format_info(info()))
        return 0
    if args.command == "train":
        from dlfast.data import DataUnavailableError

        try:
            return train_recipes.run(args)
        except DataUnavailableError as exc:
            # An expected failure (offline, say) whose message says what to do: no traceback.
            print(f"error: {exc}", file=sys.stderr)
            return 1
    from dlfast.bench.runner import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
