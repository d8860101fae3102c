"""A chat-completions request body -> a validated `ChatRequest`, or a 400 naming the field and what was expected.

Validation happens once, here, before a request takes a queue slot. Parameters this server cannot honour are
refused, never silently ignored: `n` > 1, tools and function calls, logprobs, penalties other than 0, `logit_bias`,
audio. Extensions beyond OpenAI's set: `top_k` and `repetition_penalty` (as vLLM
and llama.cpp's server accept them). One default differs from OpenAI's: without `temperature` the answer is greedy
(temperature 0), as the official inference code and `edge-vl2 run` decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from ..generate import SamplingParams
from ..inputs.template import IMAGE_PART
from .config import ServeConfig
from .errors import ApiError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted and without effect here: bookkeeping fields some clients always send.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
           "prompt_cache_key"}
MAX_STOP = 4
SEED_RANGE = 2**63


@dataclass
class ImageRef:
    url: str
    param: str  # where it was in the request, for error messages


@dataclass
class ChatRequest:
    messages: list[dict]  # processor form: role, content (a string or text strings and IMAGE_PART)
    images: list[ImageRef]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body, config: ServeConfig, model_id: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_kind(body)}")
    _refuse_unsupported(body)
    known = {"model", "messages", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens",
             "max_completion_tokens", "seed", "stop", "stream", "stream_options", "n", "response_format",
             "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "modalities",
             "tools", "tool_choice", "functions", "function_call", "audio", "prediction"} | IGNORED
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"unknown field {unknown[0]!r}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("expected the model name (a string); GET /v1/models lists it", "model")
    if model != model_id:
        raise ApiError(404, f"model {model!r} is not served here; this server runs {model_id!r}", param="model",
                       code="model_not_found")
    messages, images = _messages(body.get("messages"))
    if len(images) > config.max_images:
        raise bad_request(f"{len(images)} images in one request; this server takes at most {config.max_images} "
                          "(--max-images)", "messages", code="too_many_images")
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None)
    if options is not None and (not stream or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise bad_request("only {\"include_usage\": true|false}, and only with stream: true", "stream_options")
    return ChatRequest(messages, images, _sampling(body, config), _stop(body.get("stop")), stream,
                       bool(options and options.get("include_usage")))


def _refuse_unsupported(body: dict) -> None:
    """Known OpenAI parameters that would change the answer in ways this server cannot do: a clear 400."""
    if body.get("n") not in (None, 1):
        raise bad_request(f"got {body['n']!r}; this server returns one choice per request (n=1): send several "
                          "requests instead", "n", code="unsupported_parameter")
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if body.get(name) is not None:
            raise bad_request("tool and function calling are not supported by this server", name,
                              code="unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        raise bad_request("log probabilities are not returned by this server", "logprobs",
                          code="unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad_request("only 0 is supported; use repetition_penalty (> 0, 1 = off) instead", name,
                              code="unsupported_parameter")
    if body.get("logit_bias"):
        raise bad_request("logit_bias is not supported", "logit_bias", code="unsupported_parameter")
    if body.get("audio") is not None or body.get("modalities") not in (None, ["text"]):
        raise bad_request("this server answers with text only", "modalities", code="unsupported_parameter")
    if body.get("prediction") is not None:
        raise bad_request("predicted outputs are not supported", "prediction", code="unsupported_parameter")


def _response_format(value) -> dict:
    """The one place `response_format` is read: OpenAI's response_format -> extra SamplingParams keyword arguments
    (`_sampling` passes them on): json_schema / json_object constrain decoding (edge_vl2/constrain.py), text is free.
    A schema the grammar engine refuses is a 400 here, before the request is queued."""
    from ..constrain import sampling_constraint_from_response_format

    try:
        return sampling_constraint_from_response_format(value)
    except UserError as e:
        raise bad_request(str(e), "response_format", code="invalid_response_format") from None


def _messages(value) -> tuple[list[dict], list[ImageRef]]:
    if not isinstance(value, list) or not value:
        raise bad_request("expected a non-empty list of messages", "messages")
    out, images = [], []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"expected an object with role and content, got {_kind(m)}", where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            what = "tool calls are not supported" if extra[0] in ("tool_calls", "function_call") else "unknown field"
            raise bad_request(f"{what} ({extra[0]!r})", f"{where}.{extra[0]}")
        role = m.get("role")
        if role in ("tool", "function"):
            raise bad_request(f"role {role!r}: tool calling is not supported", f"{where}.role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"unknown role {role!r} (use system, user or assistant)", f"{where}.role")
        if "content" not in m:
            raise bad_request("content is missing", f"{where}.content")
        content = _content(m["content"], ROLES[role], f"{where}.content", images)
        out.append({"role": ROLES[role], "content": content})
    return out, images


def _content(value, role: str, where: str, images: list[ImageRef]) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise bad_request(f"expected a string or a list of content parts, got {_kind(value)}", where)
    parts = []
    for k, part in enumerate(value):
        at = f"{where}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                raise bad_request("a text part is {\"type\": \"text\", \"text\": \"...\"}", at)
            parts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"images may only be in user messages, not {role} messages", at)
            ref = part.get("image_url")
            if set(part) - {"type", "image_url"} or not isinstance(ref, dict) or set(ref) - {"url", "detail"} \
                    or ref.get("detail", "auto") not in ("auto", "low", "high"):
                raise bad_request("an image part is {\"type\": \"image_url\", \"image_url\": {\"url\": "
                                  "\"data:image/...;base64,...\"}}", at)
            images.append(ImageRef(ref.get("url"), f"{at}.image_url.url"))
            parts.append(IMAGE_PART)
        elif isinstance(part, dict):
            raise bad_request(f"unsupported content part type {kind!r} (use text or image_url)", f"{at}.type")
        else:
            raise bad_request(f"expected a content part object, got {_kind(part)}", at)
    return parts


def _sampling(body: dict, config: ServeConfig) -> SamplingParams:
    # Greedy unless asked: the official DeepSeek-VL2 inference and `edge-vl2 run` decode greedily (OpenAI's default
    # is 1.0; a client wanting that sends it).
    temperature = _number(body, "temperature", 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:
        raise bad_request("must be > 0 (1 = off)", "top_p")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad_request("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, name, 1, 1 << 20, config.default_max_tokens)
    seed = _integer(body, "seed", -SEED_RANGE, SEED_RANGE - 1, None)
    constraint = _response_format(body.get("response_format"))
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=_integer(body, "top_k", 0, 1 << 20, 0),
                              repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, 1.0),
                              seed=None if seed is None else seed % SEED_RANGE, **constraint)
    except UserError as e:
        raise bad_request(str(e)) from None


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"expected a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stops)


def _number(body: dict, name: str, lo: float, hi: float, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)) \
            or not lo <= v <= hi:
        raise bad_request(f"expected a number from {lo:g} to {hi:g}, got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad_request(f"expected an integer from {lo} to {hi}, got {v!r}", name)
    return v


def _optional(body: dict, name: str, kind: type, default):
    v = body.get(name, default)
    if v is not default and not isinstance(v, kind):
        raise bad_request(f"expected {kind.__name__}, got {_kind(v)}", name)
    return v


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")
