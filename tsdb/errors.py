"""User-facing errors: one clear line that names the problem and the fix."""


class TsdbError(Exception):
    """An error caused by user input or configuration; the CLI prints it as one line."""


class DataError(TsdbError, ValueError):
    """Bad input data; the message names the series and the fix."""


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped long work after saving what can be resumed; the CLI prints the
    message (which names the resume command) and exits 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
