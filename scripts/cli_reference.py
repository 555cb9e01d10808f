#!/usr/bin/env python
"""Write docs/reference/cli.md from the command's own parsers: every subcommand's --help, with
the defaults the option fields declare. `--check` writes nothing and exits 1 when the page is
out of date (the test suite runs it), so the reference can never drift from the code.

    python scripts/cli_reference.py           # regenerate the page
    python scripts/cli_reference.py --check   # is it current?
"""
import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PAGE = ROOT / "docs" / "reference" / "cli.md"
WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the page does not depend on the terminal


def help_text(*command: str) -> str:
    """What `latentwire COMMAND --help` prints."""
    from latentwire.cli import parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parser().parse_args([*command, "--help"])
    return out.getvalue()


def render() -> str:
    os.environ["COLUMNS"] = WIDTH
    from latentwire.cli import COMMANDS

    parts = ["# Command reference\n",
             "Generated from the parsers by `python scripts/cli_reference.py`; do not edit by "
             "hand (the tests fail when it is out of date). Every `--flag_name` is also "
             "accepted as `--flag-name`; a yes/no flag is on with `--keep_question` (or "
             "`--keep_question yes`) and off with `--no_keep_question` (or `--keep_question no`).\n",
             "```text\n" + help_text() + "```\n"]
    for name in COMMANDS:
        parts.append(f"## latentwire {name}\n")
        parts.append("```text\n" + help_text(name) + "```\n")
    return "\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    text = render()
    if p.parse_args().check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python scripts/cli_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
