"""The one exception type the command line turns into a clear message and exit code 2."""


class RmtError(Exception):
    """A problem with the user's input or environment: the message names it and says how to fix it."""
