"""What a server allows and how it behaves: every limit with its default, one place (the CLI flags map onto it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..inputs.template import check_policy
from ..vision_cache import DEFAULT_CACHE_MB


@dataclass(frozen=True)
class ServeConfig:
    """Defaults are sized for a CPU kiosk answering one photo in tens of seconds; the README's "Serve" lists them.

    `model_id`: the name /v1/models reports and requests must use (default: the bundle or checkpoint folder name).
    `api_key`: when set, every route but /health needs `Authorization: Bearer <key>`.
    `allowed_local_media`: a folder whose files requests may name as image URLs (`file:///...` or a plain path);
    None refuses every local path.
    `max_queue`: requests waiting for the model (the one being answered not counted); one more gets 503.
    `max_body_bytes`, `max_images` (per request), `max_image_pixels` (per image, from its header before decoding).
    `request_timeout_s`: from arrival to the last token, queue included; past it the request ends with 504.
    `default_max_tokens`: new tokens when a request names none. `special_tokens`: what special-token strings in
    message text do ("grounding", "escape" or the official "parse"; see inputs/template.py).
    `vision_cache_mb`: encoded images kept between requests (0 = none). `retry_after_s`: sent with 503.
    `grace_s`: on SIGTERM / Ctrl-C, how long in-flight requests may finish before they are cancelled.
    """

    model_id: str | None = None
    api_key: str | None = None
    allowed_local_media: Path | None = None
    max_queue: int = 16
    max_body_bytes: int = 32 * 2**20
    max_images: int = 4
    max_image_pixels: int = 24_000_000
    request_timeout_s: float = 600.0
    default_max_tokens: int = 512
    special_tokens: str = "grounding"
    vision_cache_mb: float = DEFAULT_CACHE_MB
    retry_after_s: int = 10
    grace_s: float = 30.0

    def __post_init__(self):
        check_policy(self.special_tokens)
        for name in ("max_queue", "max_body_bytes", "max_images", "max_image_pixels", "default_max_tokens",
                     "retry_after_s"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "grace_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise UserError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if not 0 <= self.vision_cache_mb < math.inf:
            raise UserError(f"vision_cache_mb must be a number >= 0, got {self.vision_cache_mb}")
        if self.allowed_local_media is not None and not Path(self.allowed_local_media).is_dir():
            raise UserError(f"{self.allowed_local_media}: --allowed-local-media must be an existing folder")
