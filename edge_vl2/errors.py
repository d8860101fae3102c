"""The one exception type that user-facing entry points turn into a one-line message."""


class UserError(Exception):
    """Bad input from the user (file, image, prompt, checkpoint, bundle): reported in one line, no traceback."""
