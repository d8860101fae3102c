"""`edge-vl2 chat`: an interactive, multi-turn conversation about images in the terminal (edge_vl2.conversation)."""

from __future__ import annotations

import click

from ..errors import UserError
from . import types
from .common import load_pipeline, model_options, one_line_errors, sampling_options, sampling_params, stats_line

HELP = """commands:
  /image PATH   attach an image to your next message (repeat for two)
  /reset        forget the conversation
  /save FILE    write the conversation as JSON
  /help         this list
  /quit         leave (Ctrl-D too); Ctrl-C stops an answer, not the chat"""


@click.command()
@model_options
@click.option("--system", default=None, help="System text placed before the first turn.")
@sampling_options
@click.option("--vision-cache-mb", default=256.0, show_default=True, type=types.FiniteFloat(min=0),
              help="Encoded images kept between turns (0 = off).")
@click.option("--stats/--no-stats", default=False, help="Print token counts and timings after each answer.")
@one_line_errors
def chat(model, bundle, dtype, device_profile, backend, skip_verify, torch_device, system, max_new_tokens,
         temperature, top_p, top_k, repetition_penalty, seed, vision_cache_mb, stats):
    """Chat about images: type a question, /image PATH to attach a photo, /help for the commands.

    History stays within the model's 4,096-token context: the oldest turns are dropped (with a line saying so).
    Special-token strings you type (<|ref|>, <|grounding|>, ...) are read as the tokens, as the official processor
    does: it is your own prompt.
    """
    from ..conversation import Conversation

    sampling = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    vl2 = load_pipeline(model, bundle, dtype, device_profile, backend, skip_verify, torch_device)
    conv = Conversation(vl2, system=system, vision_cache_mb=vision_cache_mb)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    click.echo("edge-vl2 chat: /image PATH attaches a photo, /help lists the commands, /quit leaves.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            click.echo("")
            return
        except KeyboardInterrupt:
            click.echo("\n(/quit or Ctrl-D leaves)")
            continue
        if line.startswith("/"):
            if not command(conv, line):
                return
        elif line:
            answer(conv, line, sampling, stats)


def command(conv, line: str) -> bool:
    """Run a /command; False when the chat should end."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            click.echo(HELP)
        elif name == "/reset":
            conv.reset()
            click.echo("(conversation cleared)")
        elif name == "/image":
            if not arg:
                raise UserError("/image needs a path")
            conv.attach(arg)
            w, h = conv.pending[-1][1].size
            click.echo(f"(attached {arg}, {w}x{h}; it goes with your next message)")
        elif name == "/save":
            if not arg:
                raise UserError("/save needs a file name")
            path = conv.save(arg)
            click.echo(f"(saved {len(conv.to_dict()['messages'])} messages to {path})")
        else:
            click.echo(f"unknown command {name}; /help lists them")
    except UserError as e:
        click.echo(f"error: {e}")
    return True


def answer(conv, question: str, sampling, stats: bool) -> None:
    """Stream one answer; Ctrl-C at any point stops it (the part already shown stays in the history)."""
    from ..inputs.grounding import format_boxes

    pieces = None
    try:
        pieces = conv.ask(question, sampling)
        if conv.last.dropped_turns:
            click.echo(f"(dropped the oldest {conv.last.dropped_turns} turn(s) to stay within the {conv.context}-token "
                       "context)")
        click.echo("model> ", nl=False)
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo("")
        if conv.last.boxes:
            click.echo(format_boxes(conv.last.boxes))
        if stats:
            click.echo(stats_line(conv.last.inputs, conv.last.timings))
    except KeyboardInterrupt:
        if pieces is not None:
            pieces.close()
        click.echo(" [stopped]")
    except UserError as e:
        click.echo(f"\nerror: {e}" if pieces is not None else f"error: {e}")
