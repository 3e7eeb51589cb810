"""The durable task queue of ``x2v serve``: SQLite (one host, the default) or Redis (many hosts), same behaviour.

A task goes ``pending`` -> ``processing`` -> ``completed`` | ``failed`` | ``cancelled``. ``claim`` hands a worker the
oldest pending task, plus more of the oldest pending tasks with the same ``batch_key`` (they can run as one batch), under
a lease that the worker renews (``heartbeat``, ``update_progress``). A task whose lease ran out, or whose worker process
is gone from this host (``recover_dead_local_workers``), goes back to the front of the queue, or fails once it was
claimed ``max_attempts`` times. Every method that moves a task is atomic across threads and processes: two workers
never hold the same task. Tasks are kept after they finish (the HTTP API lists and serves them).

``update_progress``, ``complete``, ``fail`` and ``release`` act only on a task that is processing and held by the
calling worker; they answer False otherwise (cancelled, or recovered and taken by another worker), and the worker then
drops the task.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from x2v.errors import ConfigError, X2VError

STATES = ("pending", "processing", "completed", "failed", "cancelled")
FINAL = {"completed", "failed", "cancelled"}

# The error of a task given up after max_attempts runs whose worker died; %d is the number of runs. The Redis scripts
# format the same text, so both backends say the same.
ABANDONED_ERROR = "task given up after %d run(s): its worker stopped before finishing it (process gone or lease expired)"

QUEUE_FORMS = (
    "'sqlite' (DATA_DIR/queue.sqlite3, the default), 'sqlite:///absolute/path.sqlite3' or 'redis://host:port/db'"
)


class QueueFull(X2VError):
    """submit() while pending + processing tasks already reach max_size (the HTTP API answers 429)."""


class TaskExists(X2VError):
    """submit() with a task_id that some task (in any state) already has (the HTTP API answers 409)."""


@dataclass
class Task:
    """One task as stored. ``worker`` is cleared when the task goes back to pending; a finished task keeps the id of
    the worker that held it last. ``progress`` is cleared when the task goes back to pending (a new run starts over)."""

    id: str
    request: dict
    batch_key: str
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    worker: str | None
    progress: dict
    result: str | None
    error: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def make_worker_id() -> str:
    """``host:pid:random``: the host and pid let recover_dead_local_workers see a dead worker; the random part keeps a
    restarted process that got the same pid from taking over the old one's tasks."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def worker_process_gone(worker: str) -> bool:
    """Whether ``worker`` (from make_worker_id) names this host and a pid that no longer exists. False when that
    cannot be told: another host, an id of another form, or a platform without signal 0."""
    parts = worker.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return False
    pid = int(parts[1])
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: the pid exists, under another user
        return False
    return False


def open_queue(url: str | None, data_dir: Path, *, lease_s: float = 60.0, max_attempts: int = 3) -> TaskQueue:
    """The queue at ``url``: None or "sqlite" -> data_dir/queue.sqlite3, "sqlite:///abs/path" -> that file,
    "redis://host:port/db" (or rediss:// for TLS) -> Redis. Anything else raises ConfigError (a ValueError)."""
    if url is None or url == "sqlite":
        return SqliteQueue(Path(data_dir) / "queue.sqlite3", lease_s=lease_s, max_attempts=max_attempts)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if path.startswith("/"):
            return SqliteQueue(Path(path), lease_s=lease_s, max_attempts=max_attempts)
    elif url.startswith(("redis://", "rediss://")):
        return RedisQueue(url, lease_s=lease_s, max_attempts=max_attempts)
    raise ConfigError(f"queue address {redact_url(url)!r} is not understood: use {QUEUE_FORMS}")


def redact_url(url: str) -> str:
    """The URL without a password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable address>"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


class TaskQueue:
    """What both backends implement (see the module docstring). Times are the caller's time.time()."""

    def __init__(self, *, lease_s: float, max_attempts: int):
        if not lease_s > 0:
            raise ConfigError(f"the queue's lease must be a positive number of seconds, got {lease_s!r}")
        if not (isinstance(max_attempts, int) and max_attempts >= 1):
            raise ConfigError(f"max_attempts must be a whole number >= 1, got {max_attempts!r}")
        self.lease_s = float(lease_s)
        self.max_attempts = max_attempts

    def submit(self, request: dict, batch_key: str, *, max_size: int, task_id: str | None = None) -> Task:
        raise NotImplementedError

    def claim(self, worker: str, max_batch: int = 1) -> list[Task]:
        raise NotImplementedError

    def heartbeat(self, worker: str, task_ids: list[str]) -> None:
        raise NotImplementedError

    def update_progress(self, task_id: str, worker: str, progress: dict) -> bool:
        raise NotImplementedError

    def complete(self, task_id: str, worker: str, result: str) -> bool:
        raise NotImplementedError

    def fail(self, task_id: str, worker: str, error: str) -> bool:
        raise NotImplementedError

    def release(self, task_id: str, worker: str) -> bool:
        raise NotImplementedError

    def cancel(self, task_id: str) -> Task | None:
        raise NotImplementedError

    def get(self, task_id: str) -> Task | None:
        raise NotImplementedError

    def list(self, limit: int = 100) -> list[Task]:
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        raise NotImplementedError

    def recover_dead_local_workers(self) -> list[str]:
        """Recover (as on lease expiry) the processing tasks of workers on this host whose process is gone; returns
        the ids of those tasks."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @staticmethod
    def _check_batch(max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")

    @staticmethod
    def _new_id(task_id: str | None) -> str:
        if task_id is None:
            return uuid.uuid4().hex
        if not task_id:
            raise ValueError("task_id must not be empty")
        return task_id


def queue_full(active: int, max_size: int) -> QueueFull:
    return QueueFull(f"the queue is full: {active} tasks pending or processing, at most {max_size}; retry later")


def task_exists(task_id: str) -> TaskExists:
    return TaskExists(f"task id {task_id!r} is taken: choose another, or leave task_id out for a generated one")


# --------------------------------------------------------------------------------------------------------------------
# SQLite

SQLITE_SCHEMA = (
    # seq gives the FIFO order; AUTOINCREMENT never reuses a number, so order stays by submission
    """CREATE TABLE IF NOT EXISTS tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        request TEXT NOT NULL,
        batch_key TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        worker TEXT,
        lease_until REAL,
        progress TEXT NOT NULL DEFAULT '{}',
        result TEXT,
        error TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, seq)",
)

BUSY_TIMEOUT_S = 10.0  # how long a writer waits for another one (thread or process) before "database is locked"

HELD = "id = ? AND state = 'processing' AND worker = ?"  # the task is running under this worker


class SqliteQueue(TaskQueue):
    """The queue in one SQLite file (WAL journal). Several threads and processes on one host may share the file;
    not a network file system (WAL needs shared memory), use Redis across hosts."""

    def __init__(self, path: Path, *, lease_s: float = 60.0, max_attempts: int = 3):
        super().__init__(lease_s=lease_s, max_attempts=max_attempts)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # sqlite3 connections must not be used by two threads at once: the HTTP server's threads and the worker
        # thread each get their own.
        self._local = threading.local()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        conn = self._conn()
        # The journal mode is stored in the file: every later connection, in any process, finds WAL.
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in SQLITE_SCHEMA:
            conn.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"the task queue {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        # A connection must not cross a fork: a child process opens its own.
        if conn is None or self._local.pid != os.getpid():
            # isolation_level=None: no implicit transactions; writes that read first use BEGIN IMMEDIATE (_write).
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # NORMAL, not FULL: in WAL mode a commit is in the WAL file (the OS's cache) when it returns, so it
            # survives the process being killed (SIGKILL, OOM) and the file stays consistent; only an OS crash or power
            # loss can drop the last commits. FULL would add an fsync to every claim and progress step for that.
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._connections_lock:
                self._connections.append((os.getpid(), conn))
        return conn

    @contextmanager
    def _write(self):
        """A write transaction that reads first: BEGIN IMMEDIATE takes the write lock at once, so no other thread or
        process can change the rows between the read and the write (two claims never pick the same task)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _update_held(self, task_id: str, worker: str, assignments: str, params: tuple) -> bool:
        """One UPDATE of a task held by worker (a single statement is atomic); whether it applied."""
        cursor = self._conn().execute(f"UPDATE tasks SET {assignments} WHERE {HELD}", (*params, task_id, worker))
        return cursor.rowcount == 1

    def _recover(self, conn: sqlite3.Connection, rows: list, now: float) -> None:
        """Processing tasks (id, attempts) whose worker is gone: back to pending in their old place (seq is kept, so
        they run first again), or failed once they were claimed max_attempts times."""
        for task_id, attempts in rows:
            if attempts >= self.max_attempts:
                conn.execute(
                    "UPDATE tasks SET state = 'failed', finished_at = ?, lease_until = NULL, error = ? WHERE id = ?",
                    (now, ABANDONED_ERROR % attempts, task_id),
                )
            else:
                conn.execute(
                    "UPDATE tasks SET state = 'pending', worker = NULL, started_at = NULL, lease_until = NULL,"
                    " progress = '{}' WHERE id = ?",
                    (task_id,),
                )

    def submit(self, request: dict, batch_key: str, *, max_size: int, task_id: str | None = None) -> Task:
        task_id = self._new_id(task_id)
        request_json = json.dumps(request)
        now = time.time()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM tasks WHERE id = ?", (task_id,)).fetchone():
                raise task_exists(task_id)
            active = conn.execute("SELECT COUNT(*) FROM tasks WHERE state IN ('pending', 'processing')").fetchone()[0]
            if active >= max_size:
                raise queue_full(active, max_size)
            conn.execute(
                "INSERT INTO tasks (id, request, batch_key, state, created_at) VALUES (?, ?, ?, 'pending', ?)",
                (task_id, request_json, batch_key, now),
            )
        return Task(task_id, json.loads(request_json), batch_key, "pending", now, None, None, 0, None, {}, None, None)

    def claim(self, worker: str, max_batch: int = 1) -> list[Task]:
        self._check_batch(max_batch)
        now = time.time()
        with self._write() as conn:
            expired = conn.execute(
                "SELECT id, attempts FROM tasks WHERE state = 'processing' AND lease_until < ? ORDER BY seq", (now,)
            ).fetchall()
            self._recover(conn, expired, now)
            first = conn.execute("SELECT batch_key FROM tasks WHERE state = 'pending' ORDER BY seq LIMIT 1").fetchone()
            if first is None:
                return []  # the recoveries above still commit
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM tasks WHERE state = 'pending' AND batch_key = ? ORDER BY seq LIMIT ?",
                    (first[0], max_batch),
                )
            ]
            conn.executemany(
                "UPDATE tasks SET state = 'processing', worker = ?, started_at = ?, lease_until = ?,"
                " attempts = attempts + 1 WHERE id = ?",
                [(worker, now, now + self.lease_s, task_id) for task_id in ids],
            )
            marks = ", ".join("?" * len(ids))
            rows = conn.execute(f"SELECT * FROM tasks WHERE id IN ({marks}) ORDER BY seq", ids).fetchall()
        return [sqlite_task(row) for row in rows]

    def heartbeat(self, worker: str, task_ids: list[str]) -> None:
        if not task_ids:
            return
        deadline = time.time() + self.lease_s
        with self._write() as conn:
            conn.executemany(
                f"UPDATE tasks SET lease_until = ? WHERE {HELD}", [(deadline, task_id, worker) for task_id in task_ids]
            )

    def update_progress(self, task_id: str, worker: str, progress: dict) -> bool:
        params = (json.dumps(progress), time.time() + self.lease_s)
        return self._update_held(task_id, worker, "progress = ?, lease_until = ?", params)

    def complete(self, task_id: str, worker: str, result: str) -> bool:
        assignments = "state = 'completed', result = ?, finished_at = ?, lease_until = NULL"
        return self._update_held(task_id, worker, assignments, (result, time.time()))

    def fail(self, task_id: str, worker: str, error: str) -> bool:
        assignments = "state = 'failed', error = ?, finished_at = ?, lease_until = NULL"
        return self._update_held(task_id, worker, assignments, (error, time.time()))

    def release(self, task_id: str, worker: str) -> bool:
        assignments = "state = 'pending', worker = NULL, started_at = NULL, lease_until = NULL, progress = '{}'"
        return self._update_held(task_id, worker, assignments, ())

    def cancel(self, task_id: str) -> Task | None:
        with self._write() as conn:
            row = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            if row["state"] not in FINAL:
                conn.execute(
                    "UPDATE tasks SET state = 'cancelled', finished_at = ?, lease_until = NULL WHERE id = ?",
                    (time.time(), task_id),
                )
            row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return sqlite_task(row)

    def get(self, task_id: str) -> Task | None:
        row = self._conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else sqlite_task(row)

    def list(self, limit: int = 100) -> list[Task]:
        rows = self._conn().execute("SELECT * FROM tasks ORDER BY seq DESC LIMIT ?", (max(limit, 0),)).fetchall()
        return [sqlite_task(row) for row in rows]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state, count in self._conn().execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"):
            counts[state] = count
        return counts

    def recover_dead_local_workers(self) -> list[str]:
        workers = self._conn().execute("SELECT DISTINCT worker FROM tasks WHERE state = 'processing'").fetchall()
        dead = [worker for (worker,) in workers if worker and worker_process_gone(worker)]
        if not dead:
            return []
        marks = ", ".join("?" * len(dead))
        with self._write() as conn:  # read again under the lock: a task may have finished meanwhile
            rows = conn.execute(
                f"SELECT id, attempts FROM tasks WHERE state = 'processing' AND worker IN ({marks}) ORDER BY seq", dead
            ).fetchall()
            self._recover(conn, rows, time.time())
        return [task_id for task_id, _ in rows]

    def close(self) -> None:
        self._closed = True
        with self._connections_lock:
            # only this process's connections: closing one inherited through fork would disturb the parent's locks
            mine = [conn for pid, conn in self._connections if pid == os.getpid()]
            self._connections.clear()
        for conn in mine:
            conn.close()


def sqlite_task(row: sqlite3.Row) -> Task:
    return Task(
        id=row["id"],
        request=json.loads(row["request"]),
        batch_key=row["batch_key"],
        state=row["state"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        worker=row["worker"],
        progress=json.loads(row["progress"]),
        result=row["result"],
        error=row["error"],
    )


# --------------------------------------------------------------------------------------------------------------------
# Redis
#
# Keys (prefix "x2v:"): task:<id> a hash per task (the Task fields, request/progress as JSON, plus seq and lease_until);
# pending: sorted set of pending ids scored by seq (from INCR seq), the FIFO order; batch:<batch_key>: the same for
# one batch key, so a claim finds its batch without scanning; processing: sorted set of processing ids scored by lease
# deadline; all: every id scored by seq (list, newest first); counts: hash of finished tasks per final state.
# Every change of state runs in one Lua script, which Redis runs atomically. Times (now, lease deadlines) come from the
# caller's clock as arguments, so the hosts of the workers need clocks in step (NTP) within a small part of a lease.
# Scripts build key names from the prefix they are given: a single Redis server, not Redis Cluster.

REDIS_LUA_COMMON = """
local P = ARGV[1]
local PENDING, PROCESSING, ALL, COUNTS = P .. 'pending', P .. 'processing', P .. 'all', P .. 'counts'
local function tkey(id) return P .. 'task:' .. id end
local function bkey(batch_key) return P .. 'batch:' .. batch_key end

local function held(id, worker)
  local fields = redis.call('HMGET', tkey(id), 'state', 'worker')
  return fields[1] == 'processing' and fields[2] == worker
end

-- pending again, in its old place (its seq): it runs first again
local function to_pending(id)
  local t = tkey(id)
  local seq = redis.call('HGET', t, 'seq')
  redis.call('ZREM', PROCESSING, id)
  redis.call('HSET', t, 'state', 'pending', 'progress', '{}')
  redis.call('HDEL', t, 'worker', 'started_at', 'lease_until')
  redis.call('ZADD', PENDING, seq, id)
  redis.call('ZADD', bkey(redis.call('HGET', t, 'batch_key')), seq, id)
end

-- from pending or processing to a final state
local function to_final(id, state, now)
  local t = tkey(id)
  redis.call('ZREM', PENDING, id)
  redis.call('ZREM', bkey(redis.call('HGET', t, 'batch_key')), id)
  redis.call('ZREM', PROCESSING, id)
  redis.call('HSET', t, 'state', state, 'finished_at', now)
  redis.call('HDEL', t, 'lease_until')
  redis.call('HINCRBY', COUNTS, state, 1)
end

-- a processing task whose worker is gone: pending again, or failed once claimed max_attempts times
local function recover(id, now, max_attempts, error_format)
  local attempts = tonumber(redis.call('HGET', tkey(id), 'attempts'))
  if attempts >= max_attempts then
    to_final(id, 'failed', now)
    redis.call('HSET', tkey(id), 'error', string.format(error_format, attempts))
  else
    to_pending(id)
  end
end
"""

REDIS_SCRIPTS = {
    # ARGV: prefix, id, max_size, request JSON, batch_key, now
    "submit": """
local id = ARGV[2]
if redis.call('EXISTS', tkey(id)) == 1 then return {'exists'} end
local active = redis.call('ZCARD', PENDING) + redis.call('ZCARD', PROCESSING)
if active >= tonumber(ARGV[3]) then return {'full', active} end
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', tkey(id), 'id', id, 'request', ARGV[4], 'batch_key', ARGV[5], 'state', 'pending',
  'created_at', ARGV[6], 'attempts', 0, 'progress', '{}', 'seq', seq)
redis.call('ZADD', PENDING, seq, id)
redis.call('ZADD', bkey(ARGV[5]), seq, id)
redis.call('ZADD', ALL, seq, id)
return {'ok'}
""",
    # ARGV: prefix, worker, now, lease deadline, max_batch, max_attempts, error format -> the claimed tasks' HGETALLs
    "claim": """
local worker, now, deadline = ARGV[2], ARGV[3], ARGV[4]
for _, id in ipairs(redis.call('ZRANGEBYSCORE', PROCESSING, '-inf', '(' .. now)) do
  recover(id, now, tonumber(ARGV[6]), ARGV[7])
end
local first = redis.call('ZRANGE', PENDING, 0, 0)
if #first == 0 then return {} end
local batch = bkey(redis.call('HGET', tkey(first[1]), 'batch_key'))
local claimed = {}
for i, id in ipairs(redis.call('ZRANGE', batch, 0, tonumber(ARGV[5]) - 1)) do
  local t = tkey(id)
  redis.call('ZREM', PENDING, id)
  redis.call('ZREM', batch, id)
  redis.call('ZADD', PROCESSING, deadline, id)
  redis.call('HSET', t, 'state', 'processing', 'worker', worker, 'started_at', now, 'lease_until', deadline)
  redis.call('HINCRBY', t, 'attempts', 1)
  claimed[i] = redis.call('HGETALL', t)
end
return claimed
""",
    # ARGV: prefix, worker, lease deadline, task ids...
    "heartbeat": """
for i = 4, #ARGV do
  if held(ARGV[i], ARGV[2]) then
    redis.call('ZADD', PROCESSING, ARGV[3], ARGV[i])
    redis.call('HSET', tkey(ARGV[i]), 'lease_until', ARGV[3])
  end
end
return 0
""",
    # ARGV: prefix, id, worker, progress JSON, lease deadline
    "progress": """
if not held(ARGV[2], ARGV[3]) then return 0 end
redis.call('HSET', tkey(ARGV[2]), 'progress', ARGV[4], 'lease_until', ARGV[5])
redis.call('ZADD', PROCESSING, ARGV[5], ARGV[2])
return 1
""",
    # ARGV: prefix, id, worker, final state, field, value, now
    "finish": """
if not held(ARGV[2], ARGV[3]) then return 0 end
to_final(ARGV[2], ARGV[4], ARGV[7])
redis.call('HSET', tkey(ARGV[2]), ARGV[5], ARGV[6])
return 1
""",
    # ARGV: prefix, id, worker
    "release": """
if not held(ARGV[2], ARGV[3]) then return 0 end
to_pending(ARGV[2])
return 1
""",
    # ARGV: prefix, id, now -> the task's HGETALL after the call, nil when unknown
    "cancel": """
local state = redis.call('HGET', tkey(ARGV[2]), 'state')
if not state then return false end
if state == 'pending' or state == 'processing' then to_final(ARGV[2], 'cancelled', ARGV[3]) end
return redis.call('HGETALL', tkey(ARGV[2]))
""",
    # ARGV: prefix, now, max_attempts, error format, then pairs of task id, worker -> the recovered ids
    "recover": """
local recovered = {}
for i = 5, #ARGV, 2 do
  if held(ARGV[i], ARGV[i + 1]) then
    recover(ARGV[i], ARGV[2], tonumber(ARGV[3]), ARGV[4])
    recovered[#recovered + 1] = ARGV[i]
  end
end
return recovered
""",
}


class RedisQueue(TaskQueue):
    """The queue in Redis, shared by API and worker processes on many hosts."""

    def __init__(self, url: str, *, lease_s: float = 60.0, max_attempts: int = 3, prefix: str = "x2v:"):
        super().__init__(lease_s=lease_s, max_attempts=max_attempts)
        try:
            import redis  # only here: the SQLite queue needs no redis package
        except ImportError as error:
            raise X2VError(f"the queue at {redact_url(url)} needs the redis package: pip install redis") from error
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, decode_responses=True)
        try:
            self._redis.ping()  # fail at startup with the address, not at the first request
        except redis.RedisError as error:
            raise X2VError(f"cannot reach the Redis queue at {redact_url(url)}: {error}") from error
        self._scripts = {
            name: self._redis.register_script(REDIS_LUA_COMMON + body) for name, body in REDIS_SCRIPTS.items()
        }

    def _run(self, name: str, *args):
        return self._scripts[name](args=[self.prefix, *args])

    def submit(self, request: dict, batch_key: str, *, max_size: int, task_id: str | None = None) -> Task:
        task_id = self._new_id(task_id)
        request_json = json.dumps(request)
        now = time.time()
        answer = self._run("submit", task_id, max_size, request_json, batch_key, now)
        if answer[0] == "exists":
            raise task_exists(task_id)
        if answer[0] == "full":
            raise queue_full(int(answer[1]), max_size)
        return Task(task_id, json.loads(request_json), batch_key, "pending", now, None, None, 0, None, {}, None, None)

    def claim(self, worker: str, max_batch: int = 1) -> list[Task]:
        self._check_batch(max_batch)
        now = time.time()
        claimed = self._run("claim", worker, now, now + self.lease_s, max_batch, self.max_attempts, ABANDONED_ERROR)
        return [redis_task(fields) for fields in claimed]

    def heartbeat(self, worker: str, task_ids: list[str]) -> None:
        if task_ids:
            self._run("heartbeat", worker, time.time() + self.lease_s, *task_ids)

    def update_progress(self, task_id: str, worker: str, progress: dict) -> bool:
        return self._run("progress", task_id, worker, json.dumps(progress), time.time() + self.lease_s) == 1

    def complete(self, task_id: str, worker: str, result: str) -> bool:
        return self._run("finish", task_id, worker, "completed", "result", result, time.time()) == 1

    def fail(self, task_id: str, worker: str, error: str) -> bool:
        return self._run("finish", task_id, worker, "failed", "error", error, time.time()) == 1

    def release(self, task_id: str, worker: str) -> bool:
        return self._run("release", task_id, worker) == 1

    def cancel(self, task_id: str) -> Task | None:
        fields = self._run("cancel", task_id, time.time())
        return None if fields is None else redis_task(fields)

    def get(self, task_id: str) -> Task | None:
        fields = self._redis.hgetall(self.prefix + "task:" + task_id)
        return redis_task(fields) if fields else None

    def list(self, limit: int = 100) -> list[Task]:
        if limit <= 0:
            return []
        ids = self._redis.zrevrange(self.prefix + "all", 0, limit - 1)
        pipe = self._redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.prefix + "task:" + task_id)
        return [redis_task(fields) for fields in pipe.execute() if fields]

    def counts(self) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=True)  # one consistent view
        pipe.zcard(self.prefix + "pending")
        pipe.zcard(self.prefix + "processing")
        pipe.hgetall(self.prefix + "counts")
        pending, processing, finished = pipe.execute()
        counts = dict.fromkeys(STATES, 0)
        counts.update({state: int(count) for state, count in finished.items() if state in counts})
        counts.update(pending=pending, processing=processing)
        return counts

    def recover_dead_local_workers(self) -> list[str]:
        ids = self._redis.zrange(self.prefix + "processing", 0, -1)
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.prefix + "task:" + task_id, "worker", "seq")
        held = sorted(
            (int(seq), task_id, worker)
            for task_id, (worker, seq) in zip(ids, pipe.execute())
            if worker and seq and worker_process_gone(worker)
        )  # in queue order, as the SQLite queue answers
        pairs = [item for _, task_id, worker in held for item in (task_id, worker)]
        if not pairs:
            return []
        # the script checks each task is still held by that worker: it may have finished since the read above
        return list(self._run("recover", time.time(), self.max_attempts, ABANDONED_ERROR, *pairs))

    def close(self) -> None:
        self._redis.close()


def redis_task(fields) -> Task:
    """A Task from a task hash: HGETALL's dict, or the flat [field, value, ...] list a script returns."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2]))

    def number(name: str) -> float | None:
        value = fields.get(name)
        return None if value is None else float(value)

    return Task(
        id=fields["id"],
        request=json.loads(fields["request"]),
        batch_key=fields["batch_key"],
        state=fields["state"],
        created_at=float(fields["created_at"]),
        started_at=number("started_at"),
        finished_at=number("finished_at"),
        attempts=int(fields["attempts"]),
        worker=fields.get("worker"),
        progress=json.loads(fields.get("progress") or "{}"),
        result=fields.get("result"),
        error=fields.get("error"),
    )
