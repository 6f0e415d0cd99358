"""What the command lines share: the help format, and how a command reports its result or a refusal."""

import argparse
import sys
from collections.abc import Callable

from .errors import ConversionError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description's paragraphs as written, and each option's default after its help."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or "").lower():
            return action.help  # flags, and defaults the help text states itself
        return super()._get_help_string(action)


def run_command(action: Callable[[], object], done: str) -> int:
    """Run `action`; print `done` (formatted with its result) and return 0, or print a refusal's message and return 1."""
    try:
        result = action()
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(done.format(result), file=sys.stderr)
    return 0
