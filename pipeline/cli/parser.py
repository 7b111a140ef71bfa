"""The argument parser of every `lgca` command: short errors that name a mistyped flag and its likely fix."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

SUGGESTION_CUTOFF = 0.6  # difflib similarity above which a known flag is offered for a mistyped one


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are three lines, not the whole usage, and name mistyped flags first.

    argparse checks required arguments before it reports unknown ones, so `lgca run --outptu x` would say
    only "required: --output"; this parser looks at what it was given and says `--outptu` is unknown, and
    that `--output` is probably meant. Subcommand parsers are of this class too (argparse builds them with
    the parent's class).
    """

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._given = list(sys.argv[1:] if args is None else args)  # what error() inspects for unknown flags
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        command = self._chosen_command()
        if command is not None:  # "unrecognized arguments" of a subcommand reach the top parser: its parser says it
            command.error(message)
        # Only where argparse speaks of missing or unknown arguments does a mistyped flag explain it better.
        about_arguments = message.startswith(("unrecognized arguments", "the following arguments are required"))
        unknown = self.unknown_options(getattr(self, "_given", ())) if about_arguments else []
        if unknown:
            message = "; ".join(unknown)
        else:
            message += _closest_choice(message, self._actions)
        sys.stderr.write(f"{self.prog}: error: {message}\n{self.short_usage()}\nsee '{self.prog} --help' for every option\n")
        sys.exit(2)

    def _chosen_command(self) -> Parser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for token in getattr(self, "_given", ()):
                    chosen = action.choices.get(token)
                    if isinstance(chosen, Parser) and hasattr(chosen, "_given"):
                        return chosen
        return None

    def unknown_options(self, given: Sequence[str]) -> list[str]:
        """One phrase per flag in `given` this parser does not know, with the closest known flag where one is close."""
        known = [option for option in self._option_string_actions if option.startswith("--")]
        phrases = []
        for token in given:
            if token == "--":
                break
            if not token.startswith("--") or token in self._option_string_actions:
                continue
            name = token.split("=", 1)[0]
            if name in self._option_string_actions or (self.allow_abbrev and any(o.startswith(name) for o in known)):
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=SUGGESTION_CUTOFF)
            phrases.append(f"unrecognized argument {name}" + (f" (did you mean {close[0]}?)" if close else ""))
        return phrases

    def short_usage(self) -> str:
        """`usage: PROG` with the positionals and required flags only; the rest is `[options]`."""
        parts = [self.prog]
        for action in self._actions:
            if action.option_strings and action.required:
                parts.append(f"{action.option_strings[-1]} {action.metavar or action.dest.upper()}")
            elif isinstance(action, argparse._SubParsersAction):
                parts.append(str(action.metavar or "COMMAND"))
            elif not action.option_strings:
                parts.append(self._format_positional(action))
        return "usage: " + " ".join(parts) + " [options]"

    def _format_positional(self, action: argparse.Action) -> str:
        name = action.metavar if isinstance(action.metavar, str) else action.dest
        if action.nargs in ("+", argparse.ONE_OR_MORE):
            return f"{name} [{name} ...]"
        if action.nargs in ("*", argparse.ZERO_OR_MORE):
            return f"[{name} ...]"
        if action.nargs == "?":
            return f"[{name}]"
        return str(name)


def _closest_choice(message: str, actions: Sequence[argparse.Action]) -> str:
    """ " (did you mean 'x'?)" for argparse's "invalid choice: 'y'" when a choice is close; else ""."""
    match = re.search(r"invalid choice: '([^']*)'", message)
    if not match:
        return ""
    choices = [str(c) for action in actions if action.choices for c in action.choices]
    close = difflib.get_close_matches(match.group(1), choices, n=1, cutoff=SUGGESTION_CUTOFF)
    return f" (did you mean '{close[0]}'?)" if close else ""
