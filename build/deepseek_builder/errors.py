"""The builder's one error type: a message for the user, printed without a traceback."""


class BuildError(Exception):
    """A build cannot go on; the message says what to fix."""
