"""Command line entry point of ``reclo-agent`` (a stub until the CLI lands)."""

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reclo-agent",
        description="ReClo backup agent (commands: login, backup, list, restore, "
        "schedule; not implemented yet).",
    )
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
