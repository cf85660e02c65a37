"""Write docs/options.md, the reference of every option of every ``ddpm-cars`` command.

The page is rendered from the parser that :func:`ddpm_cars.cli.build_parser` returns, so it
says what ``ddpm-cars COMMAND --help`` says::

    python tools/options_doc.py           # write docs/options.md
    python tools/options_doc.py --check   # exit 1 when docs/options.md differs from the parser
    python tools/options_doc.py --stdout  # print the page instead of writing it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # document this working tree, installed or not
    sys.path.insert(0, str(ROOT / "src"))

from ddpm_cars.cli import PROG, build_parser  # noqa: E402

DOC = ROOT / "docs" / "options.md"
DOC_NAME = "docs/options.md"
COMMAND = "python tools/options_doc.py"

INTRO = f"""\
# Command-line options

Every option of every `{PROG}` command, as `{PROG} COMMAND --help` prints it. This page is
generated from the option declarations: `{COMMAND}` rewrites it and
`{COMMAND} --check` tells whether it is current.
"""


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subparsers of ``parser`` by name, in the order they were declared."""
    return dict(_subparsers(parser).choices)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _flags(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """``--steps N``, ``--ema / --no-ema``, ``RUN``: the action as its usage writes it."""
    if not action.option_strings:
        return f"`{formatter._format_args(action, action.dest)}`"
    if isinstance(action, argparse.BooleanOptionalAction):
        return " / ".join(f"`{flag}`" for flag in action.option_strings)
    if action.nargs == 0:
        return ", ".join(f"`{flag}`" for flag in action.option_strings)
    args = formatter._format_args(action, action.dest.upper())
    return ", ".join(f"`{flag} {args}`" for flag in action.option_strings)


def _section(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    formatter = parser._get_formatter()
    lines = [f"## `{PROG} {name}`", "", parser.description or summary, ""]
    default = [parser._positionals, parser._optionals]  # one table, as the usage line orders them
    groups = [(None, default)] + [(g, [g]) for g in parser._action_groups if g not in default]
    for group, members in groups:
        actions = [
            a
            for g in members
            for a in g._group_actions
            if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
        ]
        if not actions:
            continue
        if group is not None:
            lines += [f"### {group.title[:1].upper()}{group.title[1:]}", ""]
            lines += [group.description, ""] if group.description else []
        lines += ["| Option | Description |", "| --- | --- |"]
        lines += [f"| {_cell(_flags(a, formatter))} | {_cell(formatter._expand_help(a))} |" for a in actions]
        lines.append("")
    for exclusive in parser._mutually_exclusive_groups:
        names = [f"`{(a.option_strings or [a.metavar or a.dest])[0]}`" for a in exclusive._group_actions]
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
        lines += [
            f"Exactly one of {listed} is required." if exclusive.required else f"{listed} exclude each other.",
            "",
        ]
    if parser.epilog:
        lines += ["```text", parser.epilog.rstrip(), "```", ""]
    return lines


def render(parser: argparse.ArgumentParser) -> str:
    """The Markdown page of every option of every subcommand of ``parser``."""
    commands = subcommands(parser)
    summaries = {a.dest: a.help or "" for a in _subparsers(parser)._choices_actions}
    lines = [INTRO, "## Commands", ""]
    lines += [f"- [`{PROG} {name}`](#{PROG}-{name}): {summaries.get(name, '')}" for name in commands]
    lines.append("")
    for name, sub in commands.items():
        lines += _section(name, sub, summaries.get(name, ""))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=f"Write {DOC_NAME} from the option declarations of {PROG}.")
    mode = cli.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {DOC_NAME} is not what would be written")
    mode.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    args = cli.parse_args(argv)
    text = render(build_parser())
    if args.stdout:
        sys.stdout.write(text)
    elif args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC_NAME} is out of date with the options of {PROG}: run `{COMMAND}`", file=sys.stderr)
            return 1
    else:
        DOC.write_text(text, encoding="utf-8", newline="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
