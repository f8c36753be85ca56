"""``pointswitch``: serve, migrate, demo, admin, sim."""

from __future__ import annotations

import argparse
import sys

from . import admin, batches, days, demo, messages, operators, reversals, run, sim


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pointswitch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run.add_parsers(sub)
    demo.add_parsers(sub)
    admin_sub = admin.add_parsers(sub)
    reversals.add_parsers(admin_sub)
    days.add_parsers(admin_sub)
    batches.add_parsers(admin_sub)
    operators.add_parsers(admin_sub)
    sim.add_parsers(sub)
    messages.add_parsers(p, admin_sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sim":
        sim.check_args(args)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
