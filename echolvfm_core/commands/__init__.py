"""Subcommands of the ``echolvfm`` CLI, one module each (see :mod:`echolvfm_core.cli`), and the error they raise.

:class:`CommandError` is defined here, not in :mod:`echolvfm_core.cli`, so that ``python -m echolvfm_core.cli``
(which runs cli.py as ``__main__``, a second copy of that module) catches the very class the commands raise.
"""

__all__ = ["CommandError"]


class CommandError(ValueError):
    """A user-facing error from a subcommand: printed as one line, exit code 2."""
