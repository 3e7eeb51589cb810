"""The task queue of `x2v serve` (x2v/server/queue.py) on its real backends: SQLite files in tmp_path and a real
redis-server process. Every behavioural test runs on both."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serving import free_port
from x2v.errors import X2VError
from x2v.server.queue import FINAL, STATES, QueueFull, RedisQueue, SqliteQueue, TaskExists, make_worker_id, open_queue

REPO = Path(__file__).resolve().parent.parent
LEASE_S = 0.2  # short leases for the expiry tests
EXPIRE_S = 0.35  # sleep long enough for a LEASE_S lease to run out


@pytest.fixture(params=["sqlite", "redis"])
def queue_url(request, tmp_path):
    """The queue address of one backend, empty."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'queue.sqlite3'}"
    import redis

    url = request.getfixturevalue("redis_server")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def make_queue(queue_url, tmp_path):
    """Opens queues on the test's backend (several share one store), closed at the end."""
    opened = []

    def make(**options):
        queue = open_queue(queue_url, tmp_path / "data", **options)
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        queue.close()


@pytest.fixture
def queue(make_queue):
    return make_queue()


def submit_many(queue, keys, max_size=1000):
    return [queue.submit({"prompt": f"task {i}"}, key, max_size=max_size).id for i, key in enumerate(keys)]


def ids(tasks):
    return [task.id for task in tasks]


def test_submit_and_get(queue):
    task = queue.submit({"prompt": "a cat", "seed": 3}, "k", max_size=10)
    assert len(task.id) == 32 and task.state == "pending" and task.attempts == 0
    stored = queue.get(task.id)
    assert stored == task
    assert stored.request == {"prompt": "a cat", "seed": 3} and stored.progress == {}
    assert stored.started_at is None and stored.finished_at is None and stored.worker is None
    assert json.loads(json.dumps(stored.to_dict()))["request"] == {"prompt": "a cat", "seed": 3}
    assert set(stored.to_dict()) == {
        "id", "request", "batch_key", "state", "created_at", "started_at", "finished_at", "attempts", "worker",
        "progress", "result", "error",
    }  # fmt: skip
    assert queue.get("nope") is None
    assert queue.counts() == {"pending": 1, "processing": 0, "completed": 0, "failed": 0, "cancelled": 0}


def test_fifo_order(queue):
    submitted = submit_many(queue, ["a", "b", "c", "a", "b"])
    worker = make_worker_id()
    claimed = [ids(queue.claim(worker)) for _ in range(6)]
    assert claimed == [[i] for i in submitted] + [[]]
    assert ids(queue.list()) == submitted[::-1]  # newest first
    assert ids(queue.list(limit=2)) == submitted[:-3:-1]


def test_queue_full(queue):
    worker = make_worker_id()
    first, _ = submit_many(queue, ["k", "k"], max_size=2)
    with pytest.raises(QueueFull, match="full"):
        queue.submit({}, "k", max_size=2)
    assert queue.claim(worker) and queue.counts()["pending"] == 1
    with pytest.raises(QueueFull):  # processing tasks count too
        queue.submit({}, "k", max_size=2)
    assert queue.complete(first, worker, "first.mp4")
    queue.submit({}, "k", max_size=2)  # a finished task frees its place
    assert isinstance(QueueFull("x"), X2VError)


def test_duplicate_task_id(queue):
    worker = make_worker_id()
    assert queue.submit({"prompt": "mine"}, "k", max_size=10, task_id="my-task_1").id == "my-task_1"
    with pytest.raises(TaskExists, match="my-task_1"):
        queue.submit({}, "k", max_size=10, task_id="my-task_1")
    [task] = queue.claim(worker)
    queue.complete(task.id, worker, "r.mp4")
    with pytest.raises(TaskExists):  # finished tasks keep their id
        queue.submit({}, "k", max_size=10, task_id="my-task_1")
    assert queue.get("my-task_1").request == {"prompt": "mine"}


def test_claim_batches_equal_keys_oldest_first(queue):
    a1, b1, a2, a3, a4, b2 = submit_many(queue, ["a", "b", "a", "a", "a", "b"])
    worker = make_worker_id()
    before = time.time()
    batch = queue.claim(worker, max_batch=3)
    assert ids(batch) == [a1, a2, a3]
    for task in batch:
        assert task.state == "processing" and task.worker == worker and task.attempts == 1
        assert before <= task.started_at <= time.time()
        assert queue.get(task.id) == task
    assert ids(queue.claim(worker, max_batch=3)) == [b1, b2]  # b1 is now the oldest pending
    assert ids(queue.claim(worker, max_batch=3)) == [a4]
    assert queue.claim(worker, max_batch=3) == []
    assert queue.counts()["processing"] == 6
    with pytest.raises(ValueError):
        queue.claim(worker, max_batch=0)


def test_refused_unless_held(queue):
    holder, other = make_worker_id(), make_worker_id()
    first, second = submit_many(queue, ["k", "k"])
    assert not queue.update_progress(first, holder, {"step": 1})  # pending: nobody holds it
    assert not queue.complete(first, holder, "r.mp4")
    [task] = queue.claim(holder)
    assert task.id == first
    assert not queue.update_progress(first, other, {"step": 1})
    assert not queue.complete(first, other, "r.mp4")
    assert not queue.fail(first, other, "no")
    assert not queue.release(first, other)
    assert not queue.complete("unknown", holder, "r.mp4")
    progress = {"phase": "denoise", "step": 3, "steps": 20}
    assert queue.update_progress(first, holder, progress)
    assert queue.get(first).progress == progress and queue.get(first).state == "processing"

    queue.cancel(first)
    assert not queue.update_progress(first, holder, {"step": 4})  # the worker stops here
    assert not queue.complete(first, holder, "r.mp4")
    assert not queue.fail(first, holder, "no")
    assert not queue.release(first, holder)
    assert queue.get(first).state == "cancelled" and queue.get(first).progress == progress

    [task] = queue.claim(holder)
    assert queue.fail(second, holder, "out of memory")
    failed = queue.get(second)
    assert failed.state == "failed" and failed.error == "out of memory" and failed.finished_at >= failed.started_at
    assert not queue.complete(second, holder, "r.mp4")  # final states stay


def test_complete(queue):
    worker = make_worker_id()
    [task_id] = submit_many(queue, ["k"])
    queue.claim(worker)
    assert queue.complete(task_id, worker, f"results/{task_id}/cat.mp4")
    task = queue.get(task_id)
    assert task.state == "completed" and task.result == f"results/{task_id}/cat.mp4" and task.error is None
    assert task.created_at <= task.started_at <= task.finished_at
    assert queue.counts() == {"pending": 0, "processing": 0, "completed": 1, "failed": 0, "cancelled": 0}


def test_cancel(queue):
    worker = make_worker_id()
    running, waiting, done = submit_many(queue, ["k", "k", "k"])
    assert ids(queue.claim(worker)) == [running]
    cancelled = queue.cancel(waiting)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    assert queue.cancel(running).state == "cancelled"
    assert ids(queue.claim(worker)) == [done]  # the cancelled pending task is skipped
    assert queue.complete(done, worker, "r.mp4")
    assert queue.cancel(waiting) == cancelled  # already final: unchanged
    assert queue.cancel(done).state == "completed"
    assert queue.cancel("unknown") is None
    assert queue.claim(worker) == []
    assert queue.counts() == {"pending": 0, "processing": 0, "completed": 1, "failed": 0, "cancelled": 2}
    assert set(queue.counts()) == set(STATES) and FINAL < set(STATES)


def test_release_keeps_order(queue):
    worker = make_worker_id()
    first, _ = submit_many(queue, ["k", "k"])
    queue.claim(worker)
    assert queue.update_progress(first, worker, {"step": 5})
    assert queue.release(first, worker)
    task = queue.get(first)
    assert task.state == "pending" and task.worker is None and task.attempts == 1 and task.progress == {}
    [again] = queue.claim(make_worker_id())
    assert again.id == first and again.attempts == 2


def test_lease_expiry_recovers_first_in_line(make_queue):
    queue = make_queue(lease_s=LEASE_S, max_attempts=3)
    dead, alive = make_worker_id(), make_worker_id()
    first, second = submit_many(queue, ["k", "k"])
    assert ids(queue.claim(dead)) == [first]
    time.sleep(EXPIRE_S)
    [task] = queue.claim(alive)
    assert task.id == first and task.attempts == 2 and task.worker == alive
    assert not queue.update_progress(first, dead, {"step": 1})  # the old worker lost it
    assert not queue.complete(first, dead, "r.mp4")
    assert queue.complete(first, alive, "r.mp4")
    assert ids(queue.claim(alive)) == [second]


def test_heartbeat_and_progress_renew_the_lease(make_queue):
    queue = make_queue(lease_s=LEASE_S)
    worker, other = make_worker_id(), make_worker_id()
    first, second = submit_many(queue, ["a", "b"])
    queue.claim(worker)
    queue.claim(worker)
    end = time.monotonic() + 2 * LEASE_S
    while time.monotonic() < end:
        queue.heartbeat(worker, [first])
        assert queue.update_progress(second, worker, {"step": 1})
        queue.heartbeat(other, [first, second])  # not its tasks: no effect
        time.sleep(LEASE_S / 4)
        assert queue.claim(other) == []
    time.sleep(EXPIRE_S)
    assert ids(queue.claim(other, max_batch=2)) == [first]  # expired; different batch keys
    queue.heartbeat(worker, [])


def test_max_attempts_fails_the_task(make_queue):
    queue = make_queue(lease_s=LEASE_S, max_attempts=2)
    [task_id] = submit_many(queue, ["k"])
    assert queue.claim(make_worker_id())[0].attempts == 1
    time.sleep(EXPIRE_S)
    assert queue.claim(make_worker_id())[0].attempts == 2
    time.sleep(EXPIRE_S)
    assert queue.claim(make_worker_id()) == []
    task = queue.get(task_id)
    assert task.state == "failed" and "given up after 2 run(s)" in task.error and task.finished_at is not None
    assert queue.counts()["failed"] == 1 and queue.counts()["processing"] == 0


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid no longer exists
    return process.pid


def test_recover_dead_local_workers(make_queue):
    queue = make_queue(max_attempts=2)
    dead = f"{socket.gethostname()}:{dead_pid()}:abcdef"
    alive = make_worker_id()
    remote = f"not-{socket.gethostname()}:{dead_pid()}:abcdef"  # another host: its pids say nothing here
    a1, b1, c1, a2 = submit_many(queue, ["a", "b", "c", "a"])
    assert ids(queue.claim(dead, max_batch=2)) == [a1, a2]
    assert ids(queue.claim(alive)) == [b1]
    assert ids(queue.claim(remote)) == [c1]
    assert queue.recover_dead_local_workers() == [a1, a2]
    assert [queue.get(i).state for i in (a1, b1, c1, a2)] == ["pending", "processing", "processing", "pending"]
    assert queue.get(a1).worker is None and queue.get(a1).attempts == 1
    assert queue.recover_dead_local_workers() == []

    assert ids(queue.claim(dead, max_batch=2)) == [a1, a2]  # second run, also by a dead worker: max_attempts
    assert queue.recover_dead_local_workers() == [a1, a2]
    task = queue.get(a1)
    assert task.state == "failed" and "given up after 2 run(s)" in task.error


# A child process: opens the queue, waits for the go file, claims (batches of up to 2) and completes until the queue is
# empty, and writes the ids it got as JSON.
CLAIM_LOOP = """
import json, sys, time
from pathlib import Path
from x2v.server.queue import make_worker_id, open_queue
url, data_dir, ready, go, out = sys.argv[1:]
queue = open_queue(url, Path(data_dir))
worker = make_worker_id()
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
got = []
while tasks := queue.claim(worker, max_batch=2):
    for task in tasks:
        got.append(task.id)
        assert queue.complete(task.id, worker, "r.mp4")
queue.close()
Path(out).write_text(json.dumps(got))
"""


def test_two_processes_never_claim_the_same_task(queue, queue_url, tmp_path):
    submitted = submit_many(queue, ["a", "b", "a", "a", "b"] * 40)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    go = tmp_path / "go"
    children = []
    for n in range(2):
        ready, out = tmp_path / f"ready{n}", tmp_path / f"out{n}.json"
        args = [
            sys.executable,
            "-c",
            CLAIM_LOOP,
            queue_url,
            str(tmp_path / "data"),
            str(ready),
            str(go),
            str(out),
        ]
        children.append((subprocess.Popen(args, env=env), ready, out))
    deadline = time.monotonic() + 20
    while not all(ready.exists() for _, ready, _ in children):  # both start claiming at the same moment
        assert time.monotonic() < deadline and all(child.poll() is None for child, _, _ in children)
        time.sleep(0.005)
    go.touch()
    got = []
    for child, _, out in children:
        assert child.wait(timeout=60) == 0
        got.append(json.loads(out.read_text()))
    claimed = got[0] + got[1]
    assert len(claimed) == len(set(claimed)) == len(submitted), f"claims per process: {[len(g) for g in got]}"
    assert set(claimed) == set(submitted)
    assert queue.counts()["completed"] == len(submitted)


def test_threads_share_one_queue(queue):
    submitted = submit_many(queue, ["a", "b"] * 50)
    got: list[list[str]] = [[] for _ in range(4)]

    def claim_all(n: int) -> None:
        worker = make_worker_id()
        while tasks := queue.claim(worker, max_batch=3):
            for task in tasks:
                got[n].append(task.id)
                queue.complete(task.id, worker, "r.mp4")

    threads = [threading.Thread(target=claim_all, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [task_id for part in got for task_id in part]
    assert sorted(claimed) == sorted(submitted)
    assert queue.counts()["completed"] == len(submitted)


# ---- SQLite only ----


def test_sqlite_survives_reopening(tmp_path):
    data_dir = tmp_path / "new" / "data"  # created on open
    queue = open_queue(None, data_dir)
    assert isinstance(queue, SqliteQueue) and (data_dir / "queue.sqlite3").is_file()
    worker = make_worker_id()
    first, second, third = submit_many(queue, ["k", "k", "k"])
    queue.claim(worker)
    queue.update_progress(first, worker, {"step": 2})
    queue.cancel(third)
    before = [queue.get(i) for i in (first, second, third)]
    queue.close()
    with pytest.raises(RuntimeError, match="closed"):
        queue.get(first)

    reopened = open_queue("sqlite", data_dir)
    assert [reopened.get(i) for i in (first, second, third)] == before
    assert reopened.complete(first, worker, "r.mp4")  # the same worker id still holds it
    assert ids(reopened.claim(worker)) == [second]
    reopened.close()
    assert open_queue(f"sqlite://{data_dir / 'queue.sqlite3'}", tmp_path / "elsewhere").get(first).state == "completed"


def test_sqlite_submit_survives_sigkill(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from x2v.server.queue import open_queue\n"
        "queue = open_queue(None, Path(sys.argv[1]))\n"
        "queue.submit({'prompt': 'kept'}, 'k', max_size=10, task_id='survivor')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    assert (
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False, env=env).returncode == -signal.SIGKILL
    )
    with open_queue(None, tmp_path) as queue:
        task = queue.get("survivor")
        assert task.state == "pending" and task.request == {"prompt": "kept"}


def test_open_queue_addresses(tmp_path, redis_server):
    for url in ("postgres://db/0", "sqlite://relative.sqlite3", "", "memory", "redis"):
        with pytest.raises(ValueError, match="sqlite:///absolute/path.sqlite3"):
            open_queue(url, tmp_path)
    with pytest.raises(ValueError) as caught:
        open_queue("amqp://user:secret@host/", tmp_path)
    assert "secret" not in str(caught.value)
    with pytest.raises(ValueError, match="lease"):
        open_queue(None, tmp_path, lease_s=0)
    with pytest.raises(ValueError, match="max_attempts"):
        open_queue(None, tmp_path, max_attempts=0)
    with open_queue(redis_server, tmp_path) as queue:
        assert isinstance(queue, RedisQueue)
    with pytest.raises(X2VError, match="cannot reach") as caught:
        open_queue(f"redis://:secret@127.0.0.1:{free_port()}/0", tmp_path)
    assert "secret" not in str(caught.value)


def test_worker_id():
    host, pid, tag = make_worker_id().rsplit(":", 2)
    assert host == socket.gethostname() and pid == str(os.getpid()) and len(tag) == 6
    assert make_worker_id() != make_worker_id()
