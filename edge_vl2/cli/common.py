"""What every command shares: bad input ends in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys

import click

from ..errors import UserError


def one_line_errors(fn):
    """Bad input ends with one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory (try a smaller model, fewer images or --max-new-tokens)", err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)

    return wrapper
