"""Errors the CLI turns into a one-paragraph message instead of a traceback."""


class FinetuneError(Exception):
    """A problem the user can act on (bad data, missing files, a run folder in the way...)."""
