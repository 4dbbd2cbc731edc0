"""Every flag of every command line has a help line, shows its default, and no raw reST markup."""

from __future__ import annotations

import argparse

import pytest

from engine.cli import build_parser as engine_parser
from planner.cli import build_parser as planner_parser
from profiler.cli import build_parser as profiler_parser


def _commands(parser: argparse.ArgumentParser, prefix: str):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


COMMANDS = [
    *_commands(engine_parser(), "engine"),
    *_commands(planner_parser(), "planner"),
    *_commands(profiler_parser(), "profiler"),
]


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_flag_has_help_and_its_default(name: str, parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    assert "``" not in text and "`" not in (parser.description or ""), f"{name}: raw reST markup"
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if not (action.help or "").strip():
            missing.append(action.dest)
            continue
        default = action.default
        if action.option_strings and default not in (None, False, argparse.SUPPRESS):
            shown = parser._get_formatter()._get_help_string(action) % {"default": default, "prog": name}
            assert "default" in shown, f"{name} {action.option_strings[0]}: default {default!r} not shown"
    assert not missing, f"{name}: flags without help: {missing}"


def test_engine_description_is_a_whole_sentence() -> None:
    text = engine_parser().format_help()
    assert "generate" in text and "bench" in text and "serve" in text
    assert (engine_parser().description or "").rstrip().endswith(".")
