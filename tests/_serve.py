"""A real `edge-vl2 serve` process on loopback for the HTTP tests: started on a free port, its stderr kept in a file
so tests can read what it logged, stopped with SIGTERM."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import IMAGES

API_KEY = "test-key"


class ServerProcess:
    def __init__(self, args: list, log_path: Path, ready_timeout: float = 180):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_vl2.cli", "serve", "--port", "0", *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=self._log, text=True)
        self.url = self._wait_for_port(ready_timeout)
        self._wait_ready(ready_timeout)

    def log(self) -> str:
        return self.log_path.read_text()

    def _wait_for_port(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = httpx.get(f"{self.url}/health", timeout=10).json()["status"]
            if status == "ready":
                return
            if status == "failed" or self.proc.poll() is not None:
                raise RuntimeError(f"model failed to load:\n{self.log()}")
            time.sleep(0.2)
        raise RuntimeError(f"model not ready in {timeout} s:\n{self.log()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def data_url(path: Path | str = IMAGES / "monday.jpg", mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *urls: str) -> list[dict]:
    return [{"role": "user", "content": [*map(image_part, urls), {"type": "text", "text": text}]}]
