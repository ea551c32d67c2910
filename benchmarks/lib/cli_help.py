"""`--help` for the benchmark commands: each flag's default said once, and only when there is one."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says its default or there is none to say
    (None, False, or a suppressed default), where argparse's own formatter prints it again or as None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text
