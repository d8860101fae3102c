"""`edge-vl2 serve`: the OpenAI-compatible local server (edge_vl2.serve) over one bundle or checkpoint."""

from __future__ import annotations

import click

from ..errors import UserError
from ..inputs.template import SPECIAL_TOKEN_POLICIES
from . import types
from .common import check_model_choice, load_pipeline, model_options, one_line_errors


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback prints a warning (set --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="0 picks a free port (printed).")
@click.option("--api-key", envvar="EDGE_VL2_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health [env EDGE_VL2_API_KEY].")
@click.option("--model-name", default=None,
              help="The model name clients send and /v1/models lists [default: the bundle or checkpoint folder].")
@click.option("--allowed-local-media", type=click.Path(file_okay=False), default=None,
              help="A folder whose images requests may name by path or file:// URL (else data: URLs only).")
@click.option("--max-queue", default=16, show_default=True, type=types.POSITIVE,
              help="Requests that may wait for the model; one more gets 503 with Retry-After.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=types.POSITIVE_FLOAT, help="Largest request body (413).")
@click.option("--max-images", default=4, show_default=True, type=types.POSITIVE, help="Images per request.")
@click.option("--max-image-mp", default=24.0, show_default=True, type=types.POSITIVE_FLOAT,
              help="Megapixels per image, read from its header before decoding.")
@click.option("--request-timeout", default=600.0, show_default=True, type=types.POSITIVE_FLOAT,
              help="Seconds from arrival (queue included) to the last token; then 504.")
@click.option("--max-tokens", "default_max_tokens", default=512, show_default=True, type=types.POSITIVE,
              help="New tokens for requests that name no max_tokens.")
@click.option("--special-tokens", type=click.Choice(SPECIAL_TOKEN_POLICIES), default="grounding", show_default=True,
              help="Special-token strings in message text: grounding = only <|ref|>/<|det|>/<|grounding|> are "
                   "tokens, escape = none are, parse = all are (the official processor; lets clients forge roles).")
@click.option("--vision-cache-mb", default=256.0, show_default=True, type=types.FiniteFloat(min=0),
              help="Encoded images kept between requests (0 = off).")
@click.option("--grace", default=30.0, show_default=True, type=types.POSITIVE_FLOAT,
              help="On SIGTERM / Ctrl-C, seconds in-flight requests may take to finish.")
@one_line_errors
def serve(model, bundle, dtype, device_profile, backend, skip_verify, torch_device, host, port, api_key, model_name,
          allowed_local_media, max_queue, max_body_mb, max_images, max_image_mp, request_timeout, default_max_tokens,
          special_tokens, vision_cache_mb, grace):
    """Serve one model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health).

    Give either --model (a checkpoint, reference mode) or --bundle. The model loads in the background; /health says
    "loading", then "ready". Stops cleanly (exit 0) on SIGTERM or Ctrl-C.
    """
    import logging
    import os
    import sys
    from pathlib import Path

    try:
        from ..serve.app import create_app
        from ..serve.config import ServeConfig
        from ..serve.server import serve_app
    except ImportError as e:
        raise UserError(f"the server needs the serve extra ({e.name} is missing): pip install 'edge-vl2[serve]'") \
            from None
    check_model_choice(model, bundle, dtype, backend, skip_verify)
    config = ServeConfig(model_id=model_name or Path(bundle or model).name, api_key=api_key,
                         allowed_local_media=Path(allowed_local_media) if allowed_local_media else None,
                         max_queue=max_queue, max_body_bytes=int(max_body_mb * 2**20), max_images=max_images,
                         max_image_pixels=int(max_image_mp * 1e6), request_timeout_s=request_timeout,
                         default_max_tokens=default_max_tokens, special_tokens=special_tokens,
                         vision_cache_mb=vision_cache_mb, grace_s=grace)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    app = create_app(config=config, loader=lambda: load_pipeline(model, bundle, dtype, device_profile, backend,
                                                                  skip_verify, torch_device),
                     on_load_failure=lambda _msg: app.state.serve.stop_server())
    serve_app(app, host, port, grace)
    state = app.state.serve
    if state.status == "failed":
        sys.exit(2)  # the reason is already on stderr, in one line
    if state.loading is not None and state.loading.is_alive():
        # Stopped while the model was still loading and the grace period is over: the interpreter must not
        # finalise under torch's loader thread (it aborts), so leave without finalising; nothing is left to save.
        logging.getLogger("edge_vl2.serve").info("stopped while the model was still loading")
        logging.shutdown()
        os._exit(0)
