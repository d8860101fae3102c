"""Response bodies in OpenAI's shapes, plus this server's two documented extra fields.

- `boxes`: grounding boxes of the answer, `[{"label": str | null, "box": [x1, y1, x2, y2] (pixels of the last image,
  null when the request had none), "box_999": [x1, y1, x2, y2] (the model's 0..999 grid)}]`; [] when none.
- `timings`: seconds spent decoding images and tokenising (`prepare_s`), waiting (`queue_s`), in the vision tower
  (`vision_s`), prefill, decode, to the first token from arrival (`ttft_s`) and in all (`total_s`), plus
  `vision_tiles` and `vision_tiles_cached` (tiles served from the vision cache: the tower was skipped for them).

Both are on the non-streaming completion and on the streamed chunk that carries `finish_reason`.
"""

from __future__ import annotations

import json
import uuid

from starlette.responses import JSONResponse

from .errors import ApiError


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(rid: str, created: int, model: str, outcome) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None,
                         "finish_reason": outcome.finish_reason}],
            "usage": usage(outcome), "boxes": outcome.boxes, "timings": outcome.timings}


def usage(outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


def usage_chunk(rid: str, created: int, model: str, outcome) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(outcome)}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def models(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model(model_id, created)]}


def model(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edge-vl2"}
