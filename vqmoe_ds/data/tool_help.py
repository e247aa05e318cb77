"""The ``--help`` layout of the data tools (tools/get_data.py, preprocess_data.py, train_tokenizer.py)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (its example commands keep their lines and ``\\`` continuations), and every
    flag that has a default shows it (required flags, switches and unset options show none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        d = action.default
        if action.required or d is None or d is False or d == argparse.SUPPRESS or d == [] or "%(default)" in help_text:
            return help_text
        return super()._get_help_string(action)
