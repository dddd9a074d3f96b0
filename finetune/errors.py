"""Errors the CLI turns into a one-paragraph message instead of a traceback. Imports nothing of finetune."""


class FinetuneError(Exception):
    """A problem the user can act on (bad data, missing files, a run folder in the way...)."""


class RunInterrupted(FinetuneError):
    """The run stopped on a signal after saving a checkpoint. `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
