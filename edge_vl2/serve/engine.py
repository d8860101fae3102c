"""What the server does with the model: a validated request -> prompt inputs (before queueing), and a queued job ->
streamed text, finish reason, usage, grounding boxes and timings (on the worker thread)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import UserError
from .config import ServeConfig
from .errors import ApiError, bad_request
from .media import load_image_url
from .schema import ChatRequest


@dataclass
class Outcome:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max tokens or the context's end)
    prompt_tokens: int
    completion_tokens: int
    boxes: list = field(default_factory=list)  # GroundingBox.to_dict() of each box, pixels of the last image
    timings: dict = field(default_factory=dict)


def prepare_inputs(vl2, request: ChatRequest, config: ServeConfig):
    """Decode the request's images and tokenise the conversation (the official template, `config.special_tokens`
    for typed special tokens). Runs in a request thread, before the request waits for the model."""
    images = [load_image_url(ref.url, ref.param, config.max_image_pixels, config.allowed_local_media)
              for ref in request.images]
    try:
        inputs = vl2.processor.process(request.messages, images, special_tokens=config.special_tokens)
    except UserError as e:
        raise bad_request(str(e), "messages") from None
    context = vl2.model.cfg.language.max_position_embeddings
    if inputs.seq_len >= context:
        raise bad_request(f"the prompt is {inputs.seq_len} tokens ({sum(inputs.num_image_tokens)} for images); the "
                          f"model's context is {context} and the answer needs at least one; use fewer or smaller "
                          "images or a shorter history", "messages", code="context_length_exceeded")
    return inputs


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that could still become one, so no stop string is
    ever sent, also when it arrives split over several tokens."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else piece
        self.held += piece
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held, self.hit = self.held[:min(found)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def run_job(vl2, job) -> None:
    """Generate the job's answer on the worker thread, emitting text pieces and then the outcome."""
    req, inputs = job.request, job.inputs
    start = time.monotonic()
    if start > job.deadline:
        raise ApiError(504, "the request's deadline passed while it waited in the queue", code="timeout")
    timings: dict = {"prepare_s": job.prepare_s, "queue_s": start - job.queued_at}
    stop, detok = StopMatcher(req.stop), vl2.tokenizer.stream()
    sent: list[str] = []
    n, finish = 0, None
    tokens = vl2.tokens(inputs, req.sampling, timings)
    try:
        for token, _ in tokens:
            n += 1
            if n == 1:
                timings["ttft_s"] = time.monotonic() - job.arrived
            piece = stop.feed(detok.add(token))
            if piece:
                sent.append(piece)
                job.emit("text", piece)
            if stop.hit:
                finish = "stop"
                break
            if job.cancelled.is_set():
                return
            if time.monotonic() > job.deadline:
                raise ApiError(504, f"the request's deadline passed after {n} tokens", code="timeout")
    except UserError as e:  # e.g. a prompt the cache cannot hold
        raise bad_request(str(e), "messages") from None
    finally:
        tokens.close()
    if not stop.hit:
        tail = stop.feed(detok.flush())
        tail += stop.flush()
        finish = "stop" if stop.hit else None
        if tail:
            sent.append(tail)
            job.emit("text", tail)
    text = "".join(sent)
    timings["total_s"] = time.monotonic() - job.arrived
    job.emit("done", Outcome(
        text=text, finish_reason=finish or timings["finish_reason"],  # a stop string, else the pipeline's
        prompt_tokens=inputs.seq_len, completion_tokens=n, boxes=[b.to_dict() for b in vl2.boxes(text, inputs)],
        timings={k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()}))
