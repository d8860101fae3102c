"""What every command shares: bad input ends in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys

import click

from ..errors import UserError, one_line


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


class OneLineGroup(click.Group):
    """The `edge-vl2` group: a usage error (an unknown option, a value out of range) is one line on stderr too, not
    click's usage block, with click's exit status (2)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # `edge-vl2` alone prints the help
            sys.exit(e.exit_code)
        except click.ClickException as e:
            hint = f" (see {e.ctx.command_path} --help)" if isinstance(e, click.UsageError) and e.ctx else ""
            click.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
