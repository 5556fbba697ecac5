"""Subcommands of the ``echolvfm`` CLI, one module each (see :mod:`echolvfm_core.cli`)."""
