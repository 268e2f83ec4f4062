"""User-facing errors: one clear line that names the problem and the fix."""


class TsdbError(Exception):
    """An error caused by user input or configuration; the CLI prints it as one line."""


class DataError(TsdbError, ValueError):
    """Bad input data; the message names the series and the fix."""
