"""Real ``x2v serve`` processes on loopback for the service tests: start, wait until /health answers, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

# A few fast steps on tiny frames: every request's defaults (the server's config).
SMALL_CONFIG = {"infer_steps": 2, "target_video_length": 5, "target_height": 64, "target_width": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path
    data_dir: Path

    def client(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model: Path | None, data_dir: Path, *flags: str, config: dict | None = None,
                 http: bool = True, timeout: float = 120, command: tuple[str, ...] | None = None) -> Server:
    """``python -m x2v.server --model_path MODEL --data_dir DATA_DIR FLAGS`` (``http=False``: a ``--worker``
    process, not waited for). The config (default SMALL_CONFIG) goes in a file beside the data folder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = data_dir.parent / f"{data_dir.name}.config.json"
    config_file.write_text(json.dumps(SMALL_CONFIG if config is None else config))
    port = free_port()
    args = [*(command or (sys.executable, "-m", "x2v.server")), "--data_dir", str(data_dir), "--config_json",
            str(config_file), "--port", str(port), *flags]
    if model is not None:
        args += ["--model_path", str(model)]
    log = data_dir.parent / f"{data_dir.name}.{'http' if http else 'worker'}.{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("X2V_API_KEY", None)  # the key is what the flags say
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", log, data_dir)
    if http:
        wait_healthy(server, timeout)
    return server


def wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"x2v serve exited with {server.process.returncode}:\n{server.output()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"x2v serve did not answer /health in {timeout} s:\n{server.output()[-3000:]}")


def wait_for(client: httpx.Client, task_id: str, states=("completed", "failed", "cancelled"),
             timeout: float = 120, check=None) -> dict:
    """Poll a task's status until it is in one of ``states`` (and ``check(status)`` holds, when given)."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = client.get(f"/v1/tasks/{task_id}/status").json()
        if status["status"] in states and (check is None or check(status)):
            return status
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not reach {states} in {timeout} s; last status: {status}")
