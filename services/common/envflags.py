"""Every command-line flag has an environment variable.

`apply(parser, env)` runs after a program has declared its flags: each flag
`--some-flag` takes its default from `LLMMESH_SOME_FLAG` (or a name given in
`names`) when that variable is set and not empty, and `--help` shows the variable. A flag
on the command line still wins over the environment. A value of the wrong
type is refused at start, naming the variable.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

PREFIX = "LLMMESH_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def variable(action: argparse.Action, names: Mapping[str, str] | None = None) -> str:
    """The environment variable of a flag: `--max-in-flight` -> LLMMESH_MAX_IN_FLIGHT."""
    if names and action.dest in names:
        return names[action.dest]
    return PREFIX + action.dest.upper()


def apply(
    parser: argparse.ArgumentParser,
    env: Mapping[str, str],
    names: Mapping[str, str] | None = None,
) -> None:
    """Defaults from `env` for every optional flag of `parser`, and the
    variable's name in each flag's help."""
    for action in parser._actions:
        if not action.option_strings or isinstance(
            action, (argparse._HelpAction, argparse._VersionAction)
        ):
            continue
        var = variable(action, names)
        if env.get(var):  # unset or empty: the flag's own default
            action.default = _convert(parser, action, var, env[var])
        shown = "" if action.default in (None, False, "") else f", default {action.default}"
        suffix = f"[env {var}{shown}]".replace("%", "%%")
        action.help = f"{action.help} {suffix}" if action.help else suffix


def _convert(
    parser: argparse.ArgumentParser, action: argparse.Action, var: str, raw: str
) -> object:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            parser.error(f"{var}={raw!r}: expected 1/0, true/false, yes/no or on/off")
        on = word in _TRUE
        return on if isinstance(action, argparse._StoreTrueAction) else not on
    if action.type is None:
        value: object = raw
    else:
        try:
            value = action.type(raw)  # type: ignore[operator]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{var}={raw!r}: {exc}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"{var}={raw!r}: must be one of {choices}")
    return value
