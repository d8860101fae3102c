"""An `image_url` of a request -> a decoded RGB image, or a 400 that says what was wrong with it.

Accepted: `data:image/<type>;base64,<data>` (what the OpenAI clients, vLLM, llama.cpp's server and Ollama send), and,
only when the server names a folder with `--allowed-local-media DIR`, `file:///path` or a plain path inside that
folder (symlinks resolved first, so a link cannot lead out of it). http(s) URLs are refused: the device is offline
and a server that fetches URLs for its clients is a way into the local network.
"""

from __future__ import annotations

import base64
import binascii
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ..errors import UserError
from ..inputs.images import load_image
from .errors import bad_request

# Pillow's decompression-bomb check is switched to an error through the warnings filters, which are process-wide:
# decoding one image at a time keeps request threads from changing them under each other.
_decode_lock = threading.Lock()


def load_image_url(url, param: str, max_pixels: int, allowed_dir: Path | None) -> Image.Image:
    if not isinstance(url, str) or not url:
        raise bad_request("expected a non-empty string (a data: URL)", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data, name = _data_url(url, param), f"{param} (data URL)"
    elif scheme in ("http", "https"):
        raise bad_request("remote image URLs are not fetched (this server is offline); send the image as "
                          "data:image/...;base64,...", param, code="remote_url_refused")
    elif scheme in ("file", "") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        path = _local_path(url, param, allowed_dir)
        data, name = path, f"{param} ({path.name})"
    else:
        raise bad_request(f"unsupported URL scheme {scheme!r}; send the image as data:image/...;base64,...", param)
    try:
        with _decode_lock:
            return load_image(data, max_pixels=max_pixels, name=name)
    except UserError as e:
        raise bad_request(str(e).removeprefix(f"{name}: "), param, code="invalid_image") from None


def _data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request("a data URL needs a comma before its data (data:image/png;base64,...)", param)
    media = header[5:].split(";")
    if not media[0].lower().startswith("image/"):
        raise bad_request(f"data URL media type {media[0] or '(none)'!r} is not an image (expected image/...)",
                          param)
    if "base64" not in (p.lower() for p in media[1:]):
        raise bad_request("only base64 data URLs are accepted (data:image/...;base64,...)", param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the data URL is not valid base64 ({e})", param, code="invalid_base64") from None
    if not data:
        raise bad_request("the data URL holds no bytes", param, code="invalid_image")
    return data


def _local_path(url: str, param: str, allowed_dir: Path | None) -> Path:
    if allowed_dir is None:
        raise bad_request("local file paths are refused; send the image as a data: URL, or start the server with "
                          "--allowed-local-media DIR", param, code="local_path_refused")
    raw = unquote(urlparse(url).path) if url.lower().startswith("file:") else url
    root = Path(allowed_dir).resolve()
    path = (root / raw).resolve() if not Path(raw).is_absolute() else Path(raw).resolve()
    if not path.is_relative_to(root):
        raise bad_request(f"{raw} is outside the allowed media folder {root}", param, code="local_path_refused")
    if not path.is_file():
        raise bad_request(f"{raw}: no such file in the allowed media folder", param, code="invalid_image")
    return path
