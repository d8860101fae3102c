"""`edge-vl2 serve-bench`: what the server costs and what the vision cache saves, on one model in one process.

    edge-vl2 serve-bench --bundle tiny-int4 --device cpu-kiosk --image photo.jpg --repeats 3

One pipeline is loaded; the server app runs over it on a loopback port in a thread of this process, so the HTTP path
and the in-process path share the very same weights, caches and threads. Per repeat, interleaved:

- `ttft_first`: a streamed question about the photo with the vision cache empty (time to the first content chunk,
  measured by the client), then `ttft_second`: another question about the same photo (the tower is skipped);
- `run`: the in-process path of `edge-vl2 run` (load the image file, prepare, generate) and `http`: the same request
  through the server (base64 data URL, JSON, queue, worker thread), both with the photo's tiles in the cache and the
  same greedy token count; `overhead` = http - run.

Medians are reported with every sample. One JSON object on stdout.
"""

from __future__ import annotations

import base64
import json
import statistics
import threading
import time
from pathlib import Path


def _start_server(vl2, max_tokens: int):
    import uvicorn

    from ..serve.app import create_app
    from ..serve.config import ServeConfig
    from ..serve.server import bind

    app = create_app(vl2, ServeConfig(default_max_tokens=max_tokens, request_timeout_s=3600))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.serve.model_id


def _ttft(client, model: str, url: str, question: str, max_tokens: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    first, timings = None, {}
    for chunk in client.chat.completions.create(model=model, max_tokens=max_tokens, stream=True, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].finish_reason:
            timings = chunk.model_extra["timings"]
    return first, timings


def run_bench(vl2, image: str, repeats: int, max_tokens: int, log=print) -> dict:
    import openai

    from ..generate import SamplingParams

    if vl2.vision_cache is None:
        vl2.enable_vision_cache()
    server, thread, base, model = _start_server(vl2, max_tokens)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=3600)
    url = "data:image/jpeg;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    question = "Describe the image."
    samples: dict[str, list] = {k: [] for k in ("ttft_first_s", "ttft_second_s", "vision_first_s", "run_s",
                                                "http_s", "overhead_s")}
    try:
        for r in range(repeats):
            vl2.vision_cache.clear()
            first, t1 = _ttft(client, model, url, question, 2)
            second, t2 = _ttft(client, model, url, "What colours are in it?", 2)
            assert t2["vision_tiles_cached"] == t2["vision_tiles"], "the second question was not a cache hit"
            samples["ttft_first_s"].append(first)
            samples["ttft_second_s"].append(second)
            samples["vision_first_s"].append(t1["vision_s"])
            t0 = time.perf_counter()  # `edge-vl2 run`'s work after loading, image file to last token
            result = vl2.generate(vl2.prepare(question, [image], auto_image_tags=True),
                                  SamplingParams(max_new_tokens=max_tokens))
            samples["run_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            resp = client.chat.completions.create(model=model, max_tokens=max_tokens, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}])
            samples["http_s"].append(time.perf_counter() - t0)
            samples["overhead_s"].append(samples["http_s"][-1] - samples["run_s"][-1])
            assert resp.choices[0].message.content == result.text, "server and in-process answers differ"
            log(f"repeat {r + 1}/{repeats}: ttft {first:.2f} s -> {second:.2f} s (cache hit); run {samples['run_s'][-1]:.2f}"
                f" s, http {samples['http_s'][-1]:.2f} s ({len(result.token_ids)} tokens)")
    finally:
        server.should_exit = True
        thread.join(30)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"image": str(image), "repeats": repeats, "max_tokens": max_tokens, "pipeline": vl2.info,
            "tokens": len(result.token_ids), "prompt_tokens": result.prompt_tokens,
            "median": {k: round(v, 4) for k, v in med.items()},
            "ttft_second_over_first": round(med["ttft_second_s"] / med["ttft_first_s"], 4),
            "http_over_run": round(med["http_s"] / med["run_s"], 4),
            "samples": {k: [round(x, 4) for x in v] for k, v in samples.items()}}


def main(vl2, image: str, repeats: int, max_tokens: int, out: str | None) -> None:
    report = run_bench(vl2, image, repeats, max_tokens)
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
