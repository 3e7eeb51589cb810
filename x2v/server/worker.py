"""The worker of ``x2v serve``: takes tasks from the queue (a batch of compatible ones at a time), runs them on the
pipeline it holds, writes each result and then marks the task completed.

A task is only ever marked completed once its mp4 is in place (written to a temp file and renamed). Progress goes
to the queue at every step; the queue's answer tells whether the task is still ours: a cancelled task (or one
another worker took over) stops the run at the next step. Under torchrun the worker runs on rank 0 and hands each
batch to every rank (``follow`` is the other ranks' loop).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from x2v.errors import X2VError, first_line
from x2v.pipelines.wan import Cancelled, Pipeline
from x2v.server.queue import Task, TaskQueue, make_worker_id
from x2v.server.schema import SERVICE_FIELDS

log = logging.getLogger(__name__)

RESULTS, UPLOADS = "results", "uploads"
DEFAULT_RESULT_NAME = "video.mp4"


@dataclass
class WorkerStats:
    """What /v1/service/status and /metrics say of this process's worker."""

    busy: bool = False
    batches: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # final state -> tasks


def result_file(data_dir: Path, task: Task) -> Path:
    """Where a task's video goes: ``results/<task id>/<save_result_path or video.mp4>``."""
    return data_dir / RESULTS / task.id / (task.request.get("save_result_path") or DEFAULT_RESULT_NAME)


def generate_arguments(task: Task, data_dir: Path) -> dict[str, Any]:
    """``generate_batch``'s request for a task: the client's sampling fields as they are (fields it left out are
    not there, so the server's settings stand), images from the uploads folder, the result path."""
    request = task.request
    arguments = {key: value for key, value in request.items() if key not in SERVICE_FIELDS}
    for field_name, keyword in (("image_path", "image"), ("last_frame_path", "last_image")):
        if request.get(field_name):
            arguments[keyword] = str(data_dir / UPLOADS / request[field_name])
    arguments["save_result_path"] = str(result_file(data_dir, task))
    return arguments


class LoraSwitch:
    """The LoRA a batch asks for, attached at run time and switched between batches without reloading the model."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.current: tuple[str, float] | None = None  # (path, strength)

    def use(self, path: str | None, strength: float | None) -> None:
        wanted = (path, 1.0 if strength is None else float(strength)) if path else None
        if wanted == self.current:
            return
        if wanted and self.current and wanted[0] == self.current[0]:
            self.pipe.set_lora_strength(path, wanted[1])
        else:
            if self.current:
                self.pipe.unload_loras()
            self.current = None
            if wanted:  # a Wan2.2 A14B model: the LoRA goes to both experts
                experts = list(self.pipe.dits) if len(self.pipe.dits) == 2 else [None]
                for expert in experts:
                    self.pipe.load_lora(path, wanted[1], name=expert)
        self.current = wanted


class Worker:
    """Claims and runs tasks until ``stop()``. ``share``: under torchrun, hands a batch to the other ranks."""

    def __init__(self, pipe: Pipeline, queue: TaskQueue, data_dir: Path, *, lora_dir: Path | None = None,
                 max_batch: int = 1, poll_s: float = 0.2, share=None):
        self.pipe, self.queue, self.data_dir = pipe, queue, data_dir
        self.max_batch, self.poll_s, self.share = max_batch, poll_s, share
        self.lora_dir = lora_dir
        self.loras = LoraSwitch(pipe)
        self.id = make_worker_id()
        self.stats = WorkerStats()
        self.stopping = threading.Event()
        self.held: list[str] = []  # the ids of the batch being run, for the heartbeat

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        """The loop: a batch at a time; the queue is polled every ``poll_s`` when it is empty. A heartbeat thread
        renews the leases while a batch runs (a long VAE decode reports no steps)."""
        heartbeat = threading.Thread(target=self._heartbeat, name="x2v-heartbeat", daemon=True)
        heartbeat.start()
        try:
            while not self.stopping.is_set():
                try:
                    tasks = self.queue.claim(self.id, self.max_batch)
                except Exception as error:  # a queue briefly unreachable (Redis restarting): try again
                    log.warning("cannot take tasks from the queue: %s", first_line(error))
                    tasks = []
                if not tasks:
                    self.stopping.wait(self.poll_s)
                    continue
                self.run_batch(tasks)
        finally:
            if self.share is not None:
                try:
                    self.share({"requests": None})  # the other ranks leave their loop
                except Exception as error:  # torchrun stopped them already (it signals every rank)
                    log.info("the other ranks are gone: %s", first_line(error))

    def _heartbeat(self) -> None:
        while not self.stopping.wait(max(self.queue.lease_s / 3, 0.05)):
            held = list(self.held)
            if held:
                try:
                    self.queue.heartbeat(self.id, held)
                except Exception:  # a queue that is briefly unreachable: the next beat tries again
                    log.exception("heartbeat failed")

    def run_batch(self, tasks: list[Task]) -> None:
        """Run ``tasks`` as one batch; a batch that fails is run again one task at a time, so that each task gets
        its own error (and the others their videos)."""
        self.held, self.stats.busy = [t.id for t in tasks], True
        try:
            self._run(tasks)
        except Cancelled:
            self._stopped(tasks)
        except Exception as error:
            if len(tasks) > 1 and not self.stopping.is_set():
                log.warning("a batch of %d failed (%s); running its tasks one at a time", len(tasks),
                            first_line(error))
                for task in tasks:
                    self.run_batch([task])
                return
            self._failed(tasks[0], error)
        finally:
            self.held, self.stats.busy = [], False
        self.stats.batches += 1

    def _run(self, tasks: list[Task]) -> None:
        first = tasks[0].request  # a batch shares its LoRA (schema.BATCH_FIELDS)
        name = first.get("lora_name")
        if name and self.lora_dir is None:
            raise X2VError("this service has no --lora_dir, so it takes no lora_name")
        lora = (str(self.lora_dir / name) if name else None, first.get("lora_strength"))
        requests = [generate_arguments(task, self.data_dir) for task in tasks]
        for task in tasks:
            result_file(self.data_dir, task).parent.mkdir(parents=True, exist_ok=True)
        log.info("running %d task(s) as one batch: %s", len(tasks), " ".join(task.id for task in tasks))
        if self.share is not None:
            self.share({"requests": requests, "lora": lora})
        self.loras.use(*lora)
        results = self.pipe.generate_batch(requests, progress=False, on_progress=self._progress(tasks))
        for task, result in zip(tasks, results):
            relative = str(Path(result.path).relative_to(self.data_dir))
            if self.queue.complete(task.id, self.id, relative):
                self._count("completed")
                log.info("task %s completed: %s", task.id, relative)
            else:  # cancelled meanwhile: its video is not kept
                shutil.rmtree(Path(result.path).parent, ignore_errors=True)

    def _progress(self, tasks: list[Task]):
        """The pipeline's ``on_progress``: each report goes to the queue (with an ETA once steps were timed); True
        (stop) when none of the tasks is ours anymore (cancelled) or the worker is stopping."""
        mine = {task.id for task in tasks}
        denoise_start = time.time()

        def report(phase: str, step: int, steps: int) -> bool:
            nonlocal denoise_start
            now = time.time()
            progress = {"phase": phase, "step": step, "steps": steps}
            if phase == "denoise" and step == 0:
                denoise_start = now
            elif phase == "denoise":
                progress["eta_s"] = round((now - denoise_start) / step * (steps - step), 1)
            for task_id in list(mine):
                if not self.queue.update_progress(task_id, self.id, progress):
                    mine.discard(task_id)
            return not mine or self.stopping.is_set()

        return report

    def _stopped(self, tasks: list[Task]) -> None:
        """The run stopped: cancelled tasks stay cancelled; a worker shutting down puts its tasks back in line."""
        for task in tasks:
            if self.stopping.is_set() and self.queue.release(task.id, self.id):
                log.info("task %s put back in the queue (the worker is stopping)", task.id)
            elif getattr(self.queue.get(task.id), "state", None) == "cancelled":
                self._count("cancelled")
            shutil.rmtree(result_file(self.data_dir, task).parent, ignore_errors=True)

    def _failed(self, task: Task, error: Exception) -> None:
        if isinstance(error, (X2VError, ValueError, OSError)):
            message = first_line(error)
            log.warning("task %s failed: %s", task.id, message)
        else:  # a bug: the client gets no traceback, the log has it
            message = f"internal error (the service's log has the details under task {task.id})"
            log.exception("task %s failed", task.id)
        if self.queue.fail(task.id, self.id, message):
            self._count("failed")
        shutil.rmtree(result_file(self.data_dir, task).parent, ignore_errors=True)

    def _count(self, state: str) -> None:
        self.stats.finished[state] = self.stats.finished.get(state, 0) + 1


def follow(pipe: Pipeline, share) -> None:
    """The loop of a rank other than 0 under torchrun: run each batch rank 0 hands over, until it says stop."""
    loras = LoraSwitch(pipe)
    while True:
        message = share(None)
        if message["requests"] is None:
            return
        try:
            loras.use(*message["lora"])
            pipe.generate_batch(message["requests"], progress=False)
        except Exception as error:  # rank 0 reports the task's error
            log.debug("a batch failed on this rank too: %s", first_line(error))
