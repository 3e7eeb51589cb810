import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import ckpt_utils directly

# Triton kernels (the sage_triton attention) run in Triton's interpreter on the CPU. Triton decides when a kernel
# (or one of its own library functions) is defined, so this is set before anything imports triton.
INTERPRET_DEFAULTED = "TRITON_INTERPRET" not in os.environ  # ... by this file (see pytest_configure)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(2)


def selects_gpu_tests(config) -> bool:
    """Whether the run's ``-m`` expression takes the tests marked ``gpu`` (pyproject's addopts leave them out)."""
    expression = config.getoption("markexpr", "") or ""
    if not expression:
        return False
    try:
        from _pytest.mark.expression import Expression

        return bool(Expression.compile(expression).evaluate(lambda name, **kwargs: name == "gpu"))
    except Exception:  # noqa: BLE001 - pytest's expression module is internal: a plain reading instead
        return "gpu" in expression.replace("not gpu", "")


def pytest_configure(config):
    """The GPU tests (``-m gpu``: tests/test_gpu.py) on a CUDA machine check x2v's Triton kernels compiled for the
    card, not in the interpreter: the default set above is dropped again, before any test module (and so triton) is
    imported. A TRITON_INTERPRET given in the environment stays."""
    if INTERPRET_DEFAULTED and selects_gpu_tests(config) and torch.cuda.is_available():
        os.environ.pop("TRITON_INTERPRET", None)


FUZZ_LINES: list[str] = []  # "fuzz: N cases, seed S" of each fuzz test, shown at the end of every run


def fuzz_report(line: str) -> None:
    """Record a fuzz test's case count and seed for the run's summary (shown without -s, in CI logs too)."""
    FUZZ_LINES.append(line)


def pytest_terminal_summary(terminalreporter):
    for line in FUZZ_LINES:
        terminalreporter.write_line(line)


# A real redis-server for the service's queue tests (tests/test_server_queue.py, tests/test_server.py).
@pytest.fixture(scope="session")
def redis_server():
    """A throwaway redis-server on a free loopback port, without persistence; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: install Debian's redis-server package (apt-get install redis-server)")
    try:
        import redis
    except ImportError:
        pytest.fail("the redis Python package is missing: pip install redis")
    from serving import free_port

    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server on port {port} did not answer PING (exit code {process.poll()})")
                time.sleep(0.02)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)
