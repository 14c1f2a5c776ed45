"""Command line: ``python -m dispatcher demo | serve | poke`` (also the ``intercept-dispatch`` script).

This is the application layer: unlike the core modules it may import
transports and the bundled examples, and it does so inside each command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from examples.demo import main as demo_main

    return demo_main()


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    from transports.service import main as serve_main

    return serve_main(argv)


def _poke(args: argparse.Namespace, argv: list[str]) -> int:
    from transports.poke import main as poke_main

    return poke_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intercept-dispatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="boot a guest on KVM (or a fake VP) that drives the example UART")
    demo.set_defaults(run=_demo)
    # serve and poke parse their own options (see their --help), so they are passed on untouched.
    serve = commands.add_parser("serve", add_help=False, help="run the device backend service")
    serve.set_defaults(run=_serve, passthrough=True)
    poke = commands.add_parser("poke", add_help=False, help="send one port access to a running service")
    poke.set_defaults(run=_poke, passthrough=True)
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        result: int = args.run(args, rest)
        return result
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    result = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
