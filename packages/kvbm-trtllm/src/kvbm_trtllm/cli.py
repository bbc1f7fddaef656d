"""The ``kvbm`` command: ``bench``, ``doctor``, ``config trtllm``, ``plugins``, ``events``.

``main(argv=None) -> int`` parses ``argv`` and runs one subcommand; each lives in
``kvbm_trtllm.commands`` as ``add_parser(subparsers)`` + ``run(args) -> int``. A bad option or
value exits with status 2 and one line naming it and the fix (:class:`UsageError`); a problem
a command finds (a failed doctor check, a server that does not answer) exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kvbm_trtllm.commands import bench_cmd, config_cmd, doctor, events, plugins
from kvbm_trtllm.commands.common import CommandError, UsageError

__all__ = ["main", "build_parser"]

_COMMANDS = (bench_cmd, doctor, config_cmd, plugins, events)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvbm",
        description="kvbm: a KV block manager for TensorRT-LLM (host memory and disk tiers "
        "below the GPU's KV cache).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what kvbm does (INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"kvbm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"kvbm {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kvbm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
