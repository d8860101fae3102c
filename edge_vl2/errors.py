"""The one exception type that user-facing entry points turn into a one-line message, and how to make that line."""


class UserError(Exception):
    """Bad input from the user (file, image, prompt, checkpoint, bundle): reported in one line, no traceback."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line (a library's multi-line message would break the one-line rule)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
