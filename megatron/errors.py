"""Errors every layer may raise, defined where nothing else is imported (no import cycles)."""


class ArgumentError(ValueError):
    """Invalid configuration; the message lists every problem, one per line (exit status 2)."""
