"""POST /v1/chat/completions: read and check the request, queue it, answer as JSON or as an SSE stream.

Order of work, so that bad or unlucky requests cost little: body size (413) -> JSON and every field (400) -> a
queue slot (503) -> images decoded and the prompt tokenised in a thread (400) -> queued -> answered. Until the first
token the HTTP status can still say what went wrong (504 deadline, 503 shutdown), also for `stream: true`; after
it, a streamed error is an `{"error": ...}` event followed by `data: [DONE]`, which the openai client raises.
A client that disconnects cancels its job (waiting or running); the deadline counts from arrival.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .engine import prepare_inputs
from .errors import ApiError, bad_request, internal
from .responses import SSE_DONE, chunk, completion, completion_id, error_response, sse, usage_chunk
from .scheduler import Job
from .schema import parse_chat_request

log = logging.getLogger("edge_vl2.serve")
BODY_DRAIN_LIMIT = 64 * 2**20  # past the limit, read (and drop) this much more so the client can read our 413


class ClientGone(Exception):
    pass


async def chat_completions(request: Request) -> Response:
    state = request.app.state.serve
    arrived = time.monotonic()
    try:
        vl2, scheduler = state.require_ready()
        req = parse_chat_request(await read_json(request, state.config.max_body_bytes), state.config,
                                 state.model_id)
        scheduler.reserve()
        t0 = time.monotonic()
        try:  # the job holds the inputs alone: the worker drops them before it gives the memory back
            job = Job(req, await anyio.to_thread.run_sync(prepare_inputs, vl2, req, state.config),
                      asyncio.get_running_loop(), arrived, arrived + state.config.request_timeout_s)
        except BaseException:
            scheduler.release()
            raise
        job.prepare_s = time.monotonic() - t0
        scheduler.submit(job)
        return await respond(job, request, state)
    except ApiError as e:
        log.info("%d %s: %s", e.status, request.url.path, e.message)
        return error_response(e)
    except Exception as e:  # a bug: the one place (with the worker's) that logs a traceback
        log.exception("internal error in %s", request.url.path)
        return error_response(internal(e))


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing more than `limit` bytes (413) whatever Content-Length claims."""
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            parts.append(part)
        elif size > limit + BODY_DRAIN_LIMIT:
            break
    if size > limit:
        raise ApiError(413, f"the request body is {size / 2**20:.1f} MB or more; this server takes at most "
                            f"{limit / 2**20:.1f} MB (--max-body-mb)", code="request_too_large")
    try:
        return json.loads(b"".join(parts))
    except RecursionError:
        raise bad_request("the request body nests too deeply") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None


async def respond(job: Job, request: Request, state) -> Response:
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        event = await next_event(job, watcher)
        if job.request.stream:
            if event[0] == "error":
                raise event[1]
            watcher.cancel()  # the streaming response listens for the disconnect itself from here on
            return StreamingResponse(stream(job, event, state), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while event[0] == "text":
            event = await next_event(job, watcher)
        if event[0] == "error":
            raise event[1]
        outcome = event[1]
        state.log_done(job, outcome)
        return JSONResponse(completion(completion_id(), int(time.time()), state.model_id, outcome))
    except ClientGone:
        job.cancel("client disconnected")
        log.info("client disconnected; its request was cancelled")
        return Response(status_code=499)
    finally:
        watcher.cancel()


async def next_event(job: Job, watcher: asyncio.Future | None) -> tuple[str, object]:
    """The job's next event; ClientGone when the client left first, 504 (job cancelled) at the deadline."""
    get = asyncio.ensure_future(job.events.get())
    waiting = {get} if watcher is None else {get, watcher}
    done, _ = await asyncio.wait(waiting, timeout=max(job.deadline - time.monotonic(), 0),
                                 return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    if watcher is not None and watcher in done:
        raise ClientGone
    job.cancel("deadline")
    raise ApiError(504, f"no complete answer within the request deadline ({job.deadline - job.arrived:.0f} s, "
                        "--request-timeout)", code="timeout")


async def stream(job: Job, event, state):
    rid, created, model = completion_id(), int(time.time()), state.model_id
    finished = False
    try:
        yield sse(chunk(rid, created, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = event
            if kind == "text":
                yield sse(chunk(rid, created, model, {"content": value}))
            elif kind == "done":
                state.log_done(job, value)
                yield sse(chunk(rid, created, model, {}, value.finish_reason, boxes=value.boxes,
                                timings=value.timings))
                if job.request.include_usage:
                    yield sse(usage_chunk(rid, created, model, value))
                break
            else:
                log.info("%d %s (streamed): %s", value.status, "/v1/chat/completions", value.message)
                yield sse(value.body())
                break
            try:
                event = await next_event(job, None)
            except ApiError as e:
                event = ("error", e)
        finished = True
        yield SSE_DONE
    finally:
        if not finished:
            job.cancel("client disconnected")


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body was read before, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
