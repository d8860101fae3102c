"""Shared test paths: the official-code fixture and the photos live in tests/fixtures (see its README).

Without a CUDA device the cuda backend's Triton kernels are tested through Triton's CPU interpreter. TRITON_INTERPRET
must be set before anything imports triton (transformers does, through torch), because triton.language's own jit
helpers (tl.sum, tl.zeros) are built as compiled or interpreted functions when triton is first imported; set any later,
the kernels run interpreted but their calls into triton.language fail. conftest is loaded before any test module.
"""

import os
import signal
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
OFFICIAL = FIXTURES / "official"
TINY_LIKE = OFFICIAL / "checkpoints" / "tiny-like"
IMAGES = FIXTURES / "images"


def default_sigint() -> None:
    """preexec_fn for a child that a test interrupts: Ctrl-C as a terminal delivers it (default disposition, not
    blocked), whatever the pytest process inherited or set; an ignored or blocked SIGINT is inherited across exec."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL.is_dir():
        pytest.fail(f"official fixtures not found at {OFFICIAL}")
    return OFFICIAL


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run test-size models: one thread avoids OpenMP stalls when the machine is busy (a 2-core
    box shared with other jobs loses tens of ms per op waiting for its second thread) and changes no result."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def test_server(tmp_path_factory):
    """One `edge-vl2 serve` over the test-size Tiny INT4 bundle, shared by every HTTP test (tests/_serve.py). Small
    limits so the limit tests stay cheap: 2 waiting requests, 2 images, 2 MB bodies."""
    from _bundles import tiny_rtn_bundle
    from _serve import API_KEY, ServerProcess

    bundle = tiny_rtn_bundle(tmp_path_factory)
    server = ServerProcess(["--bundle", bundle, "--api-key", API_KEY, "--max-queue", "2", "--max-images", "2",
                            "--max-body-mb", "2", "--allowed-local-media", IMAGES, "--model-name", "tiny-test"],
                           tmp_path_factory.getbasetemp() / "serve.log")
    server.bundle = bundle
    yield server
    server.stop()
