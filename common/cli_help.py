"""Help output for the ``engine``, ``profiler`` and ``planner`` command lines: every flag shows its default.

argparse's ``ArgumentDefaultsHelpFormatter`` also prints ``(default: None)`` and ``(default: False)``, which
say nothing; this one shows a default only when there is one.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def use_everywhere(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and all its subcommands this formatter (subparsers do not inherit it)."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_everywhere(sub)
    return parser
