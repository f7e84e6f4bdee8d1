"""The command-line reference, rendered from the argparse parsers and the Makefile (never typed by hand).

Each command's section lists every subcommand and every option with its value, default and help, read from
the parser that ``--help`` prints; the make section lists every target ``make help`` names and every variable
the Makefile reads, with the ``lowrank-deploy`` flag it becomes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["BLOCKS", "PARSERS", "make_targets", "make_variables", "parser_of", "walk"]

PARSERS: dict[str, str] = {
    "lowrank-deploy": "lowrank_deploy.pipeline",
    "python -m compress": "compress.cli",
    "python -m export": "export.__main__",
    "python -m runtime": "runtime.__main__",
}
"""Command → the module whose ``build_parser()`` makes its parser."""

MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"

_NOT_FORWARDED = {
    "PYTHON": "the Python that creates the virtual environment",
    "VENV": "the virtual environment `make` creates and installs the project into",
    "FASHION_MNIST_DIR": "where `make data` and the data loader look for Fashion-MNIST",
}
"""Meaning of the variables that are not ``lowrank-deploy`` flags and have no comment of their own."""


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser of ``command`` (a key of :data:`PARSERS`), freshly built."""
    return importlib.import_module(PARSERS[command]).build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def walk(command: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``(full command, parser)`` for ``parser`` and every subcommand under it, depth first."""
    yield command, parser
    sub = _subparsers(parser)
    if sub is not None:
        for name, child in sub.choices.items():
            yield from walk(f"{command} {name}", child)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        params = {**vars(action), "prog": ""}
        if action.choices is not None:
            params["choices"] = ", ".join(str(c) for c in action.choices)
        with contextlib.suppress(KeyError, TypeError, ValueError):
            text = text % params
    return " ".join(text.split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return f"`{metavar}`" + (" …" if action.nargs in ("*", "+", argparse.REMAINDER) else "")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS, "", [], ()):
        return ""
    return f"`{action.default}`"


def _options_table(parser: argparse.ArgumentParser) -> str:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}` (positional)"
        rows.append(f"| {names} | {_value(action)} | {_default(action)} | {_cell(_help(action))} |")
    if not rows:
        return "No options."
    return "\n".join(["| option | value | default | meaning |", "|---|---|---|---|", *rows])


def _anchor(command: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", command.lower()).strip("-")


def command_reference(command: str) -> str:
    """Every subcommand of ``command`` with its options, from its parser."""
    root = parser_of(command)
    parts: list[str] = []
    for full, parser in walk(command, root):
        sub = _subparsers(parser)
        description = " ".join((parser.description or "").split()) if parser is not root else ""
        level = "###" if parser is root else "####"
        parts.append(f"{level} `{full}` {{#{_anchor(full)}}}")
        if description:
            parts.append(_cell(description))
        if sub is not None:
            helps = {a.dest: a.help or "" for a in sub._choices_actions}
            rows = [
                f"| [`{name}`](#{_anchor(f'{full} {name}')}) | {_cell(helps.get(name, ''))} |" for name in sub.choices
            ]
            parts.append("\n".join(["| subcommand | what it does |", "|---|---|", *rows]))
        has_options = any(a.option_strings and not isinstance(a, argparse._HelpAction) for a in parser._actions)
        if parser is not root or sub is None or has_options:
            parts.append(_options_table(parser))
    return "\n\n".join(parts)


# make ---------------------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"^(?:export\s+)?([A-Z][A-Z0-9_]*)\s*\?=\s*(.*?)\s*$")


def make_variables(makefile: Path = MAKEFILE) -> list[tuple[str, str, str]]:
    """``(variable, default, the comment above it)`` for every ``VAR ?= default`` of the Makefile."""
    found: list[tuple[str, str, str]] = []
    comment: list[str] = []
    for line in makefile.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            comment.append(line.lstrip("# ").rstrip())
            continue
        match = _VARIABLE.match(line)
        if match:
            found.append((match[1], match[2], " ".join(comment)))
            comment = [] if found[-1][2] else comment
            continue
        comment = []
    return found


def make_targets(makefile: Path = MAKEFILE) -> list[str]:
    """The lines ``make help`` prints (``make`` without a target prints them too)."""
    lines, inside = [], False
    for line in makefile.read_text(encoding="utf-8").splitlines():
        if line.startswith("help:"):
            inside = True
            continue
        if inside and not line.startswith("\t"):
            break
        if inside and '@echo "' in line:
            text = line.split('@echo "', 1)[1].rsplit('"', 1)[0]
            lines.append(text.replace('\\"', '"').replace("$$", "$"))
    return lines


def _flags_by_variable() -> dict[str, tuple[str, str]]:
    """Make variable → (``lowrank-deploy`` flag, its help) from the ``; env LRD_<VAR>`` ending of each help."""
    parser = parser_of("lowrank-deploy")
    sub = _subparsers(parser)
    flags: dict[str, tuple[str, str]] = {}
    for child in sub.choices.values() if sub is not None else ():
        for action in child._actions:
            match = re.search(r"; env LRD_([A-Z0-9_]+)$", action.help or "")
            if match and action.option_strings:
                flags.setdefault(match[1], (action.option_strings[0], action.help[: match.start()]))
    return flags


def make_reference() -> str:
    """``make help`` as printed, then every variable with its default and its ``lowrank-deploy`` flag."""
    flags = _flags_by_variable()
    rows = []
    for name, default, comment in make_variables():
        flag, meaning = flags.get(name, ("", ""))
        if not meaning:
            meaning = comment or _NOT_FORWARDED.get(name, "")
        rows.append(
            f"| `{name}` | {f'`{default}`' if default else ''} | {f'`{flag}`' if flag else ''} | {_cell(meaning)} |"
        )
    table = "\n".join(["| variable | default | `lowrank-deploy` flag | meaning |", "|---|---|---|---|", *rows])
    usage = "\n".join(make_targets())
    return f"```text\n{usage}\n```\n\n{table}"


BLOCKS: dict[str, Callable[[], str]] = {
    "cli.make": make_reference,
    **{f"cli.{_anchor(command)}": (lambda c=command: command_reference(c)) for command in PARSERS},
}
"""``cli.make`` and one block per command (``cli.lowrank-deploy``, ``cli.python-m-compress``, …)."""
