"""Load test of ``x2v serve`` on loopback: many clients submit at once; does every task complete exactly once?

    python benchmarks/serve_load.py                          # 200 submissions from 20 clients, --max_batch 4
    python benchmarks/serve_load.py --max_batch 1            # the same without batching
    python benchmarks/serve_load.py --requests 20 --clients 4 --json load.json --keep

What it does: writes a tiny random-weight T2V model once (``x2v.demo.write_tiny_model``, reused from
``--model_dir``), starts ``python -m x2v.server`` on a free loopback port with a fresh ``--data_dir`` and a small
config (``--steps`` steps, 64x64, 5 frames: the defaults of every request, so all tasks share one batch key),
``--max_queue_size`` above the number of submissions and ``--max_batch N``, and waits for ``/health``. Then
``--clients`` threads send ``--requests`` ``POST /v1/tasks/video`` between them, each with its own prompt and seed,
timing each submission. It then polls ``GET /v1/tasks/`` until every task is final, reads ``/metrics`` once, and
checks that every task completed exactly once: 200 on submit with a new task id, status ``completed`` with
``attempts == 1``, ``GET /v1/tasks/{id}/result`` gives a non-empty mp4, and the server's log has exactly one
``task <id> completed`` line per task (and no other task's). The server is stopped (SIGTERM, then SIGKILL after
``--stop_timeout`` s) whatever happens.

Reported: submissions, clients, max_batch, wall time (first submission to the last task's ``finished_at``),
submit throughput (submissions / the submitting phase), completion throughput (videos / wall time), submit
latency p50 / p99 / max, mean batch size (tasks the worker completed / ``x2v_worker_batches``), and OK / FAIL.
Exit status 1 on FAIL. The clients and the server share the machine: on a small CPU the worker's runs slow the
submissions down, and the submissions the worker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FINAL = ("completed", "failed", "cancelled")
DEFAULT_MODEL_DIR = Path(tempfile.gettempdir()) / "x2v-serve-load-tiny-t2v"
COMPLETED_LINE = re.compile(r"\btask (\S+) completed\b")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="submissions in all (default 200)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (threads; default 20)")
    parser.add_argument("--max_batch", type=int, default=4, help="the server's --max_batch (default 4)")
    parser.add_argument("--steps", type=int, default=2, help="infer_steps of every task (default 2)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="machine-readable results: alone, JSON on stdout instead of the table; with FILE, "
                             "also written there")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (data dir, config, server log)")
    parser.add_argument("--model_dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help=f"the tiny model, written there if missing (default {DEFAULT_MODEL_DIR})")
    parser.add_argument("--device", default="cpu", help="the server's --device (default cpu)")
    parser.add_argument("--start_timeout", type=float, default=300, help="seconds to wait for /health")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for every task to finish")
    parser.add_argument("--stop_timeout", type=float, default=60, help="seconds after SIGTERM before SIGKILL")
    args = parser.parse_args()
    if args.requests < 1 or args.clients < 1 or args.max_batch < 1 or args.steps < 1:
        parser.error("--requests, --clients, --max_batch and --steps must be 1 or more")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ---- the server

class Server:
    """``python -m x2v.server`` as a subprocess in its own session, its output in ``log``."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.data_dir = work / "data"
        config = work / "config.json"
        config.write_text(json.dumps({"infer_steps": args.steps, "target_video_length": 5, "target_height": 64,
                                      "target_width": 64}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "server.log"
        self.command = [sys.executable, "-m", "x2v.server", "--model_path", str(args.model_dir), "--data_dir",
                        str(self.data_dir), "--config_json", str(config), "--port", str(self.port), "--device",
                        args.device, "--max_queue_size", str(args.requests + 10), "--max_batch", str(args.max_batch)]
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, timeout: float) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"x2v serve exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"x2v serve did not answer /health in {timeout} s:\n{self.output()[-3000:]}")

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL (the process only: it was started in its own session) after ``timeout`` s."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.returncode = self.process.wait()
        return self.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


# ---- the load

def submit_all(url: str, requests: int, clients: int) -> tuple[list[dict], float]:
    """``clients`` threads send ``requests`` submissions between them (each takes the next index); returns one
    record per submission (index, HTTP status, task id, seconds) and the seconds the whole phase took."""
    records: list[dict | None] = [None] * requests
    counter = iter(range(requests))
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as client:

        def one_client() -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"prompt": f"load test {i}: a red car on the street at night", "seed": 1000 + i}
                start = time.perf_counter()
                try:
                    response = client.post("/v1/tasks/video", json=body)
                    status, task_id = response.status_code, None
                    if status == 200:
                        task_id = response.json().get("task_id")
                    error = None if status == 200 else response.text[:300]
                except Exception as e:  # noqa: BLE001 - a refused connection, a timeout, an answer not JSON
                    status, task_id, error = None, None, f"{type(e).__name__}: {e}"
                records[i] = {"index": i, "status": status, "task_id": task_id, "error": error,
                              "seconds": time.perf_counter() - start}

        start = time.perf_counter()
        threads = [threading.Thread(target=one_client, name=f"client-{n}", daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        missing = [{"index": i, "status": None, "task_id": None, "error": "not sent", "seconds": math.nan}
                   for i, r in enumerate(records) if r is None]
        return [r for r in records if r is not None] + missing, time.perf_counter() - start


def wait_final(client: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict]:
    """Polls the task list (and single statuses for ids it misses) until every id is final; their statuses."""
    wanted, statuses = set(ids), {}
    deadline = time.monotonic() + timeout
    while True:
        listed = client.get("/v1/tasks/", params={"limit": 1000}).json()["tasks"]
        statuses.update({s["task_id"]: s for s in listed if s["task_id"] in wanted})
        for task_id in wanted - statuses.keys():
            statuses[task_id] = client.get(f"/v1/tasks/{task_id}/status").json()
        if all(statuses[i]["status"] in FINAL for i in wanted):
            return statuses
        if time.monotonic() > deadline:
            left = sum(statuses[i]["status"] not in FINAL for i in wanted)
            raise TimeoutError(f"{left} of {len(wanted)} tasks not final after {timeout} s")
        time.sleep(0.5)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments dropped)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def run(args: argparse.Namespace, work: Path) -> dict:
    from x2v.demo import write_tiny_model

    write_tiny_model(args.model_dir, "t2v")
    server = Server(args, work)
    problems: list[str] = []
    records: list[dict] = []
    result: dict = {"submissions": args.requests, "clients": args.clients, "max_batch": args.max_batch,
                    "steps": args.steps, "device": args.device, "cpu_count": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in os.getloadavg()], "server_log": None}
    try:
        started = time.perf_counter()
        server.start(args.start_timeout)
        result["server_start_s"] = round(time.perf_counter() - started, 2)

        t0 = time.time()
        records, submit_s = submit_all(server.url, args.requests, args.clients)
        accepted = [r for r in records if r["status"] == 200 and r["task_id"]]
        for r in records:
            if r not in accepted:
                problems.append(f"submission {r['index']}: HTTP {r['status']}: {r['error']}")
        ids = [r["task_id"] for r in accepted]
        if len(set(ids)) != len(ids):
            problems.append(f"{len(ids) - len(set(ids))} task ids were given out twice")

        with httpx.Client(base_url=server.url, timeout=120) as client:
            statuses = wait_final(client, ids, args.timeout) if ids else {}
            seen_done = time.time()
            metrics_text = client.get("/metrics").text
            videos = 0
            for task_id in ids:
                status = statuses[task_id]
                if status["status"] != "completed" or status["attempts"] != 1:
                    problems.append(f"task {task_id}: {status['status']}, attempts {status['attempts']}, "
                                    f"error {status['error']!r}")
                    continue
                response = client.get(f"/v1/tasks/{task_id}/result")
                if response.status_code != 200 or not response.content or response.content[4:8] != b"ftyp":
                    problems.append(f"task {task_id}: result HTTP {response.status_code}, "
                                    f"{len(response.content)} bytes, not an mp4")
                else:
                    videos += 1

        finished = [s["finished_at"] for s in statuses.values() if s.get("finished_at")]
        wall = (max(finished) if finished else seen_done) - t0
        latencies = [r["seconds"] * 1000 for r in accepted] or [math.nan]
        metrics = metric_values(metrics_text)
        batches = metrics.get("x2v_worker_batches", 0)
        worker_completed = metrics.get('x2v_worker_tasks_finished{state="completed"}', 0)
        result.update({
            "accepted": len(accepted),
            "completed": sum(s["status"] == "completed" for s in statuses.values()),
            "videos_downloaded": videos,
            "wall_s": round(wall, 2),
            "submit_phase_s": round(submit_s, 3),
            "submit_throughput_per_s": round(len(records) / submit_s, 1),
            "completion_throughput_videos_per_s": round(videos / wall, 3) if wall > 0 else None,
            "submit_latency_ms": {"p50": round(percentile(latencies, 50), 1),
                                  "p99": round(percentile(latencies, 99), 1),
                                  "max": round(max(latencies), 1)},
            "worker_batches": int(batches),
            "mean_batch_size": round(worker_completed / batches, 2) if batches else None,
            "metrics": {k: v for k, v in metrics.items() if k.startswith("x2v_")},
        })
    except Exception as error:  # noqa: BLE001 - reported as FAIL with what was measured so far
        problems.append(f"{type(error).__name__}: {error}")
    finally:
        result["server_exit"] = server.stop(args.stop_timeout)

    # The log is whole once the server has stopped: one "task <id> completed" line per task, no stray ids.
    log = server.output()
    counts: dict[str, int] = {}
    for match in COMPLETED_LINE.finditer(log):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    ids = [r["task_id"] for r in records if r["status"] == 200 and r["task_id"]]
    wrong = {i: counts.get(i, 0) for i in ids if counts.get(i, 0) != 1}
    stray = sorted(set(counts) - set(ids))
    if wrong:
        problems.append(f"{len(wrong)} tasks without exactly one 'completed' log line, e.g. "
                        f"{dict(list(wrong.items())[:5])}")
    if stray:
        problems.append(f"'completed' log lines of unknown tasks: {stray[:5]}")
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["log_completed_lines"] = sum(counts.values())
    result["log_warnings"] = sum(" WARNING " in line or " ERROR " in line for line in log.splitlines())
    result["problems"] = problems
    result["exactly_once"] = "OK" if not problems else "FAIL"
    return result


def print_table(result: dict) -> None:
    latency = result.get("submit_latency_ms", {})
    rows = [
        ("submissions (accepted)", f"{result['submissions']} ({result.get('accepted', '-')})"),
        ("clients", result["clients"]),
        ("max_batch", result["max_batch"]),
        ("steps, size", f"{result['steps']}, 64x64, 5 frames ({result['device']})"),
        ("server start (load + /health)", f"{result.get('server_start_s', '-')} s"),
        ("wall time (first submit to last finished)", f"{result.get('wall_s', '-')} s"),
        ("submit phase", f"{result.get('submit_phase_s', '-')} s"),
        ("submit throughput", f"{result.get('submit_throughput_per_s', '-')} submissions/s"),
        ("completion throughput", f"{result.get('completion_throughput_videos_per_s', '-')} videos/s"),
        ("submit latency p50 / p99 / max",
         f"{latency.get('p50', '-')} / {latency.get('p99', '-')} / {latency.get('max', '-')} ms"),
        ("worker batches, mean batch size",
         f"{result.get('worker_batches', '-')}, {result.get('mean_batch_size', '-')}"),
        ("'task <id> completed' log lines", result.get("log_completed_lines", "-")),
        ("server exit status", result.get("server_exit")),
        ("load average before / after (1, 5, 15 min)",
         f"{result.get('load_average_before', '-')} / {result.get('load_average_after', '-')}"),
        ("every task completed exactly once", f"**{result['exactly_once']}**"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for problem in result["problems"][:20]:
        print(f"FAIL: {problem}")
    if len(result["problems"]) > 20:
        print(f"... and {len(result['problems']) - 20} more problems")


def main() -> int:
    args = parse_args()
    # SIGTERM to this script unwinds like Ctrl-C, so the server is stopped and the folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="x2v-serve-load-"))
    try:
        result = run(args, work)
        if args.keep:
            result["server_log"] = str(work / "server.log")
        if args.json and args.json != "-":
            Path(args.json).write_text(json.dumps(result, indent=2))
        if args.json == "-":
            print(json.dumps(result, indent=2))
        else:
            print_table(result)
            if args.keep:
                print(f"kept: {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if result["exactly_once"] == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
