"""`edge-vl2 soak`: many concurrent clients against a real `edge-vl2 serve` process; fails loudly on any bad answer.

    edge-vl2 soak                                  # makes a test-size bundle, 8 clients x 25 requests
    edge-vl2 soak --bundle B --clients 8 --requests 25 --out soak.json

Phases, one server process throughout:
1. warm-up: every test image alone and in a pair (fills the vision cache), then one short round at the soak's
   concurrency (`clients` x 2 requests: the queue holds that many requests' tiles at once, and ONNX Runtime's arena
   grows to the largest tile batch), then the server's RSS (the one after the sequential part is reported too);
2. soak: `clients` threads x `requests` each, through the official `openai` client: streaming or not, one or two
   images (repeats, so the vision cache is hit too), grounding prompts, greedy or seeded sampling; every response is
   checked for OpenAI's shape, usage arithmetic and finish_reason; then the RSS again (the target: within 10 % of
   after warm-up);
3. queue full: `max_queue + 8` simultaneous long requests: the surplus must get 503 with Retry-After at once, the
   rest 200, nothing left hanging;
4. SIGTERM: the server must exit 0.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QUEUE = 8


def test_images(n: int = 5, seed: int = 0) -> list[str]:
    """Synthetic photos (gradients, shapes, text-like strokes) of several sizes and aspect ratios, as data URLs."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    sizes = [(320, 240), (640, 480), (480, 800), (1024, 576), (256, 256)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(12):
            x, y = rng.randrange(w), rng.randrange(h)
            draw.rectangle([x, y, x + rng.randrange(20, w // 2), y + rng.randrange(10, h // 3)],
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG" if i % 2 else "PNG")
        out.append(f"data:image/{'jpeg' if i % 2 else 'png'};base64,{base64.b64encode(buf.getvalue()).decode()}")
    return out


def make_test_bundle(folder: Path, log) -> Path:
    from ..export.bundle_writer import ExportOptions, export_bundle
    from .synth import write_checkpoint

    log("making a test-size Tiny INT4 bundle (synthetic weights) ...")
    ckpt = write_checkpoint(folder / "ckpt", "tiny", "test")
    out = folder / "tiny-test-int4"
    export_bundle(ExportOptions(model=str(ckpt), out=str(out), recipe="int4", method="rtn", vision=("fp32",),
                                fidelity_samples=0), log=lambda _m: None)
    return out


class Server:
    """`edge-vl2 serve` in a child process, its log in a file."""

    def __init__(self, bundle: Path, log_path: Path, *args: str):
        import httpx

        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_vl2.cli", "serve", "--bundle", str(bundle),
                                      "--port", "0", "--max-queue", str(QUEUE), "--max-images", "2", *args],
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        end = time.monotonic() + 600
        self.url = None
        while time.monotonic() < end and self.proc.poll() is None:
            text = log_path.read_text()
            if self.url is None and "listening on http://" in text:
                self.url = text.split("listening on ", 1)[1].split()[0]
            if self.url and httpx.get(f"{self.url}/health", timeout=30).json()["status"] == "ready":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become ready:\n{log_path.read_text()[-2000:]}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        finally:
            self._log.close()


def check_completion(resp, max_tokens: int) -> None:
    """OpenAI's non-streaming shape, usage arithmetic, our documented extras."""
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert 0 < u.completion_tokens <= max_tokens and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert choice.finish_reason == "stop" or u.completion_tokens == max_tokens
    assert isinstance(resp.model_extra["boxes"], list) and "ttft_s" in resp.model_extra["timings"]


def check_stream(chunks: list, max_tokens: int) -> None:
    """OpenAI's chunk shape: role first, one id, one finish_reason on the last choice chunk, then usage."""
    assert chunks and chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= max_tokens
    assert "timings" in with_choices[-1].model_extra


def one_request(client, model: str, images: list[str], rng: random.Random) -> None:
    n_images = rng.choice([1, 1, 2])
    parts = [{"type": "image_url", "image_url": {"url": rng.choice(images)}} for _ in range(n_images)]
    prompt = rng.choice(["Describe the image.", "<|ref|>The red box<|/ref|>.", "What is written here?",
                         "Compare the two pictures." if n_images == 2 else "Count the shapes."])
    max_tokens = rng.randrange(4, 24)
    sampling = rng.choice([{}, {"temperature": 0.7, "top_p": 0.9, "seed": rng.randrange(1000)}])
    kwargs = dict(model=model, max_tokens=max_tokens, **sampling,
                  messages=[{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}])
    if rng.random() < 0.5:
        check_completion(client.chat.completions.create(**kwargs), max_tokens)
    else:
        check_stream(list(client.chat.completions.create(**kwargs, stream=True,
                                                         stream_options={"include_usage": True})), max_tokens)


def warm_up(url: str, model: str, images: list[str]) -> None:
    """Each image alone and in a pair, streamed and not: every code path and the vision cache's entries."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    for i, image in enumerate(images):
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in (image, images[i - 1])]
        for content, stream in ((parts[:1], False), (parts, True)):
            kwargs = dict(model=model, max_tokens=8, messages=[{"role": "user", "content": [
                *content, {"type": "text", "text": "Describe the image."}]}])
            if stream:
                check_stream(list(client.chat.completions.create(**kwargs, stream=True, stream_options={
                    "include_usage": True})), 8)
            else:
                check_completion(client.chat.completions.create(**kwargs), 8)


def soak_phase(url: str, model: str, images: list[str], clients: int, requests: int) -> dict:
    import openai

    failures: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        rng = random.Random(k)
        for _ in range(requests):
            t0 = time.monotonic()
            try:
                one_request(client, model, images, rng)
            except Exception as e:  # any failure is counted and named; the soak goes on
                with lock:
                    failures.append(f"client {k}: {type(e).__name__}: {str(e)[:200]}")
            with lock:
                latencies.append(time.monotonic() - t0)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return {"requests": clients * requests, "failed": len(failures), "failures": failures[:10],
            "wall_s": round(time.monotonic() - t0, 1), "latency_median_s": round(statistics.median(latencies), 2),
            "latency_max_s": round(max(latencies), 2)}


def queue_full_phase(url: str, model: str, images: list[str]) -> dict:
    import httpx

    n = QUEUE + 8
    body = {"model": model, "max_tokens": 200, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": images[0]}}, {"type": "text", "text": "Tell a long story."}]}]}
    barrier = threading.Barrier(n)

    def send(_):
        barrier.wait()
        t0 = time.monotonic()
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=900)
            return r.status_code, r.headers.get("Retry-After"), time.monotonic() - t0
        except httpx.HTTPError as e:
            return type(e).__name__, None, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(send, range(n)))
    refused = [r for r in results if r[0] == 503]
    return {"sent": n, "ok": sum(r[0] == 200 for r in results), "refused_503": len(refused),
            "refused_with_retry_after": sum(r[1] is not None for r in refused),
            "slowest_refusal_s": round(max((r[2] for r in refused), default=0), 2),
            "other": [r[0] for r in results if r[0] not in (200, 503)]}


def run_soak(bundle: str | None, clients: int, requests: int, log=print) -> dict:
    """All four phases; returns the report (and `passed`)."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="edge-vl2-soak-") as tmp:
        tmp = Path(tmp)
        bundle = Path(bundle) if bundle else make_test_bundle(tmp, log)
        images = test_images()
        server = Server(bundle, tmp / "serve.log")
        report: dict = {"bundle": str(bundle), "clients": clients, "requests_per_client": requests}
        try:
            model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
            log(f"server up at {server.url}; warm-up ...")
            warm_up(server.url, model, images)
            report["rss_after_sequential_warmup_mb"] = round(server.rss_mb(), 1)
            report["warmup_round"] = soak_phase(server.url, model, images, clients, 2)
            report["rss_after_warmup_mb"] = round(server.rss_mb(), 1)
            log(f"warm-up done; RSS {report['rss_after_warmup_mb']} MB; soak ...")
            report["soak"] = soak_phase(server.url, model, images, clients, requests)
            report["rss_after_soak_mb"] = round(server.rss_mb(), 1)
            report["rss_change"] = round(report["rss_after_soak_mb"] / report["rss_after_warmup_mb"] - 1, 4)
            log("queue-full burst ...")
            report["queue_full"] = queue_full_phase(server.url, model, images)
            report["server_counts"] = httpx.get(f"{server.url}/health").json()["queue"]
        finally:
            report["exit_status"] = server.stop()
            log_text = server.log_path.read_text()
            report["tracebacks_in_log"] = log_text.count("Traceback")
    q = report.get("queue_full", {})
    report["passed"] = bool(report["soak"]["failed"] == 0 and report["warmup_round"]["failed"] == 0 and abs(report["rss_change"]) <= 0.10
                            and q.get("refused_503", 0) > 0 and q.get("refused_with_retry_after") == q.get("refused_503")
                            and not q.get("other") and q.get("slowest_refusal_s", 99) < 5
                            and report["exit_status"] == 0 and report["tracebacks_in_log"] == 0)
    return report


def main(bundle: str | None, clients: int, requests: int, out: str | None) -> int:
    report = run_soak(bundle, clients, requests, log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0 if report["passed"] else 1
