"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input (file, line, field, value): message is one line naming what is wrong."""
