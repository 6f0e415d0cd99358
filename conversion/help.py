"""The help format both command lines share."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description's paragraphs as written, and each option's default after its help."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or "").lower():
            return action.help  # flags, and defaults the help text states itself
        return super()._get_help_string(action)
