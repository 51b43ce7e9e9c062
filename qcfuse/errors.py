"""Errors a user can cause and fix; the CLI prints them as one line instead of a traceback."""


class QcfuseError(Exception):
    """A problem with the user's input or environment (bad model name, empty document, prompt too long...)."""
