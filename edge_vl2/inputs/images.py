"""Image loading with one-line errors for every kind of bad file.

The official code loads images as `Image.open(path).convert("RGB")`: no EXIF rotation, alpha dropped (not
composited), palette / 16-bit / CMYK converted by Pillow's own rules. This module does the same and turns every
failure (missing, directory, not an image, truncated, decompression bomb, zero size) into a `UserError` naming
the file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from .. import checks
from ..errors import UserError, one_line

# 64 megapixels: far above any useful input (the largest tiling is 1152x1152 / 3456x384) but well below what
# could exhaust memory when decoded. Checked from the header, before any pixel data is decoded.
MAX_IMAGE_PIXELS = 64_000_000

def _check_size(name: str, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise UserError(f"{name}: image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise UserError(f"{name}: image is {w}x{h} = {w * h / 1e6:.1f} MP, over the {max_pixels / 1e6:.0f} MP limit "
                        "(possible decompression bomb)")


def load_image(image, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> Image.Image:
    """Return an RGB `PIL.Image` from a path, the bytes of an image file, or a PIL image (which is never modified).

    Raises `UserError` with one line naming the file (or `name`, for bytes) for any unreadable or unreasonable image.
    """
    if isinstance(image, Image.Image):
        _check_size(name or "image", image.size, max_pixels)
        try:
            return image.convert("RGB")
        except (ValueError, OSError) as e:
            raise UserError(f"image: cannot convert mode {image.mode} to RGB ({one_line(e)})") from None
    if isinstance(image, (bytes, bytearray)):
        return _decode(io.BytesIO(image), name or "image", max_pixels)
    if not isinstance(image, (str, Path)):
        raise UserError(f"expected an image path or a PIL image, got {type(image).__name__}")
    path = checks.regular_file(image, "image file")  # a FIFO or device would block or never end
    name = str(path)
    return _decode(path, name, max_pixels)


def _decode(path, name: str, max_pixels: int) -> Image.Image:
    """Open, fully decode and convert one image file (a path or a binary file object)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its limit raises) on huge headers; make both an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(name, im.size, max_pixels)
                im.load()  # decode everything now so truncated/corrupt data fails here, not later
                rgb = im.convert("RGB")
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{name}: image is too large, possible decompression bomb ({one_line(e)})") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{name}: not an image file in a format Pillow can read") from None
    except PermissionError:
        raise UserError(f"{name}: permission denied") from None
    except MemoryError:
        raise UserError(f"{name}: not enough memory to decode this image") from None
    except Exception as e:  # corrupt data surfaces as OSError, SyntaxError, ValueError, EOFError, zlib.error, ...
        raise UserError(f"{name}: corrupt or truncated image ({one_line(e)})") from None
    return rgb
