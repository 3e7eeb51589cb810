"""The HTTP API of ``x2v serve`` (FastAPI): LightX2V's endpoints over the durable queue, the web page, metrics.

The app never runs the model itself: it checks requests, stores their images, queues tasks and answers from the
queue; a worker (a thread of the same process, or ``x2v serve --worker`` elsewhere) runs them. Nothing a client
sends is used as a path: images become files under ``uploads/`` with names the service makes, results and LoRAs are
bare file names inside the service's folders (docs/security.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from x2v.server.queue import FINAL, STATES, QueueFull, Task, TaskExists, TaskQueue
from x2v.server.schema import FILE_ID, Limits, VideoRequest, batch_key
from x2v.server.worker import DEFAULT_RESULT_NAME, UPLOADS, Worker, WorkerStats

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "index.html"
# Request bodies above this are refused before they are read whole (base64 images make JSON bodies large).
BODY_OVERHEAD = 1 << 20


@dataclass
class Service:
    """What the app serves: the queue and folders, the limits, and (in the same process) the worker."""

    queue: TaskQueue
    data_dir: Path
    limits: Limits = field(default_factory=Limits)
    max_queue_size: int = 100
    lora_dir: Path | None = None
    api_key: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # model_cls, task, model_path name
    worker: Worker | None = None

    @property
    def stats(self) -> WorkerStats | None:
        return self.worker.stats if self.worker is not None else None


def api_error(status: int, field_name: str | None, message: str) -> HTTPException:
    """A 4xx answer in pydantic's shape, naming the field: ``{"detail": [{"loc": ["body", field], "msg": ...}]}``."""
    if field_name is None:
        return HTTPException(status, message)
    return HTTPException(status, [{"loc": ["body", field_name], "msg": message, "type": "value_error"}])


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="x2v serve", version="1", docs_url="/docs", redoc_url=None)
    metrics = Metrics(service)
    max_body = service.limits.max_image_bytes * 4 // 3 * 2 + BODY_OVERHEAD  # two base64 images and the fields

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return JSONResponse({"detail": f"request body larger than {max_body} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return JSONResponse({"detail": clean_errors(error.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        reference = uuid.uuid4().hex[:12]
        log.exception("internal error %s on %s %s", reference, request.method, request.url.path)
        return JSONResponse({"detail": f"internal error; the service's log has it under {reference}"},
                            status_code=500)

    def authorized(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), service.api_key.encode()):
            raise HTTPException(401, "this service needs 'Authorization: Bearer <its --api_key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        # The page itself is public (a browser cannot send the key to open it); its API calls carry the key.
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    def submit(fields: dict) -> dict:
        try:
            request = VideoRequest.model_validate(fields, context={"limits": service.limits})
        except ValidationError as error:
            raise RequestValidationError(prefixed(error.errors())) from None
        stored = request.model_dump(exclude_unset=True, exclude={"target_shape", "use_prompt_enhancer", "reuse",
                                                                  "presigned_url"})
        task_id = stored.pop("task_id", None)
        if stored.get("lora_name"):
            check_lora(service, stored["lora_name"])
        for name in ("image_path", "last_frame_path"):  # stored last: a request refused above leaves no file
            value = stored.pop(name, None)
            if value:
                stored[name] = stored_image(service, name, value)
        try:
            task = service.queue.submit(stored, batch_key(stored), max_size=service.max_queue_size, task_id=task_id)
        except QueueFull as error:
            raise HTTPException(429, str(error)) from None
        except TaskExists as error:
            raise api_error(409, "task_id", str(error)) from None
        metrics.submitted.inc()
        return {"task_id": task.id, "task_status": task.state,
                "save_result_path": stored.get("save_result_path", DEFAULT_RESULT_NAME)}

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise api_error(422, None, f"the body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise api_error(422, None, "the body must be one JSON object of request fields")
        return body

    # LightX2V's clients post to /v1/tasks/video/ (trailing slash) and the deprecated /v1/tasks/.
    @app.post("/v1/tasks/video", dependencies=guarded)
    @app.post("/v1/tasks/video/", dependencies=guarded, include_in_schema=False)
    @app.post("/v1/tasks/", dependencies=guarded, include_in_schema=False)
    async def create_task(request: Request) -> dict:
        return await run_in_threadpool(submit, await json_body(request))

    @app.post("/v1/tasks/video/form", dependencies=guarded)
    async def create_task_form(request: Request, image_file: UploadFile | None = File(None),
                               last_frame_file: UploadFile | None = File(None)) -> dict:
        form = await request.form()
        fields = {key: value for key, value in form.items() if isinstance(value, str) and value != ""}
        for name, upload in (("image_path", image_file), ("last_frame_path", last_frame_file)):
            if upload is not None and upload.filename:
                fields[name] = await save_upload(service, upload, name.replace("_path", "_file"))
        return await run_in_threadpool(submit, form_values(fields))

    @app.post("/v1/files/upload", dependencies=guarded)
    async def upload_file(file: UploadFile = File(...)) -> dict:
        return {"file_id": await save_upload(service, file, "file")}

    @app.get("/v1/tasks/", dependencies=guarded)
    @app.get("/v1/tasks", dependencies=guarded, include_in_schema=False)
    def list_tasks(limit: int = 100) -> dict:
        return {"tasks": [status_of(task) for task in service.queue.list(max(1, min(limit, 1000)))]}

    @app.get("/v1/tasks/queue/status", dependencies=guarded)
    def queue_status() -> dict:
        return {**service.queue.counts(), "max_queue_size": service.max_queue_size}

    def task_or_404(task_id: str) -> Task:
        task = service.queue.get(task_id)
        if task is None:
            raise HTTPException(404, f"no task {task_id!r}")
        return task

    @app.get("/v1/tasks/{task_id}/status", dependencies=guarded)
    def task_status(task_id: str) -> dict:
        return status_of(task_or_404(task_id))

    @app.get("/v1/tasks/{task_id}/events", dependencies=guarded)
    async def task_events(task_id: str, request: Request) -> StreamingResponse:
        await run_in_threadpool(task_or_404, task_id)

        async def changes():
            last = None
            while not await request.is_disconnected():
                status = status_of(await run_in_threadpool(task_or_404, task_id))
                seen = {k: v for k, v in status.items() if k != "progress"} | {"p": status["progress"].get("step")}
                if seen != last:
                    last = seen
                    yield f"data: {json.dumps(status)}\n\n"
                if status["status"] in FINAL:
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(changes(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/tasks/{task_id}/result", dependencies=guarded)
    def task_result(task_id: str) -> FileResponse:
        task = task_or_404(task_id)
        if task.state != "completed":
            raise HTTPException(409, f"task {task_id} is {task.state}, not completed: no video yet")
        path = (service.data_dir / task.result).resolve()
        if not path.is_relative_to(service.data_dir.resolve()) or not path.is_file():
            raise HTTPException(404, f"the video of task {task_id} is gone from the results folder")
        return FileResponse(path, media_type="video/mp4", filename=path.name)

    @app.delete("/v1/tasks/{task_id}", dependencies=guarded)
    def cancel_task(task_id: str) -> dict:
        before = task_or_404(task_id)
        if before.state in FINAL:
            raise HTTPException(409, f"task {task_id} is already {before.state}")
        task = service.queue.cancel(task_id) or before
        if task.state != "cancelled":  # it finished meanwhile
            raise HTTPException(409, f"task {task_id} is already {task.state}")
        return {"task_id": task_id, "status": task.state}

    @app.get("/v1/service/status", dependencies=guarded)
    def service_status() -> dict:
        counts = service.queue.counts()
        stats = service.stats
        busy = stats.busy if stats is not None else counts["processing"] > 0
        return {"service_status": "busy" if busy else "idle", **service.model,
                "queue": {**counts, "max_queue_size": service.max_queue_size}}

    @app.get("/metrics", dependencies=guarded)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def prefixed(errors: list) -> list:
    """pydantic's errors of the body model, located as FastAPI locates body fields (``["body", field]``)."""
    return [{**e, "loc": ("body", *e["loc"])} for e in errors]


def clean_errors(errors) -> list[dict]:
    """422 details without the client's input echoed back (a base64 image) and with plain messages."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")).removeprefix("Value error, "),
             "type": e.get("type", "value_error")} for e in errors]


# Form fields read as text as they are; the others as JSON values (numbers, booleans, target_shape's list).
TEXT_FIELDS = {"prompt", "negative_prompt", "save_result_path", "lora_name", "task_id", "image_path",
               "last_frame_path", "presigned_url"}


def form_values(fields: dict[str, str]) -> dict:
    """Form fields are text; numbers and booleans are read as JSON gives them, so the model checks their types."""
    values: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in TEXT_FIELDS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # left as text: the model names the field and the type it wants
        values[key] = value
    return values


def stored_image(service: Service, field_name: str, value: str) -> str:
    """A request's image as an upload's file id: an id from /v1/files/upload, or base64 data stored now."""
    if FILE_ID.fullmatch(value):
        if not (service.data_dir / UPLOADS / value).is_file():
            raise api_error(422, field_name, f"no uploaded file {value}: upload it with POST /v1/files/upload first")
        return value
    if value.startswith(("/", "./", "../", "~", "http://", "https://", "file:")):
        raise api_error(422, field_name, "paths and URLs are not taken: send the image as base64, or upload it with "
                                         "POST /v1/files/upload and send its file_id")
    data = value.partition(",")[2] if value.startswith("data:") else value
    limit = service.limits.max_image_bytes
    if len(data) > limit * 4 // 3 + 4:
        raise api_error(413, field_name, f"the image is larger than {limit} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise api_error(422, field_name, "not base64 data nor a file_id: send the image as base64, or upload it "
                                         "with POST /v1/files/upload and send its file_id") from None
    return store_image(service, raw, field_name)


async def save_upload(service: Service, upload: UploadFile, field_name: str) -> str:
    limit = service.limits.max_image_bytes
    raw = await upload.read(limit + 1)
    if len(raw) > limit:
        raise api_error(413, field_name, f"the image is larger than {limit} bytes")
    return await run_in_threadpool(store_image, service, raw, field_name)


def store_image(service: Service, raw: bytes, field_name: str) -> str:
    """Check that ``raw`` is an image of an allowed size, store it under a name the service makes, return that."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            if width * height > service.limits.max_image_pixels:
                raise api_error(422, field_name, f"the image has {width}x{height} pixels, more than this service's "
                                                 f"limit of {service.limits.max_image_pixels}")
            image.load()  # decodes it: a truncated or corrupt file fails here, not in the worker
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise api_error(422, field_name, f"not a readable image ({type(error).__name__}): send a PNG, JPEG or "
                                         "WebP picture") from None
    file_id = uuid.uuid4().hex
    folder = service.data_dir / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{file_id}.part"
    partial.write_bytes(raw)
    partial.replace(folder / file_id)
    return file_id


def check_lora(service: Service, name: str) -> None:
    if service.lora_dir is None:
        raise api_error(422, "lora_name", "this service was started without --lora_dir, so it takes no lora_name")
    path = (service.lora_dir / name).resolve()
    if not path.is_relative_to(service.lora_dir.resolve()) or not path.is_file():
        available = sorted(p.name for p in service.lora_dir.glob("*.safetensors"))[:20]
        raise api_error(422, "lora_name", f"no LoRA {name!r} in this service's LoRA folder; available: "
                                          f"{', '.join(available) or 'none'}")


def status_of(task: Task) -> dict:
    """A task as the API shows it (docs/server.md, Status object)."""
    progress = dict(task.progress or {})
    if task.state == "pending":
        progress.setdefault("phase", "queued")
    if task.started_at is not None:
        progress["elapsed_s"] = round((task.finished_at or time.time()) - task.started_at, 2)
    if task.state == "completed":
        progress = {"phase": "done", "elapsed_s": progress.get("elapsed_s")}
    return {"task_id": task.id, "status": task.state, "task_status": task.state, "created_at": task.created_at,
            "started_at": task.started_at, "finished_at": task.finished_at, "attempts": task.attempts,
            "worker": task.worker,
            "error": task.error, "save_result_path": task.request.get("save_result_path", DEFAULT_RESULT_NAME),
            "result_url": f"/v1/tasks/{task.id}/result" if task.state == "completed" else None,
            "progress": progress, "request": task.request}


class Metrics:
    """Prometheus metrics of this process (its own registry): submissions here, the queue's states at each scrape,
    and this process's worker's batches."""

    def __init__(self, service: Service):
        from prometheus_client import CollectorRegistry, Counter, Gauge
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        self.service, self.content_type = service, CONTENT_TYPE_LATEST
        self.registry = CollectorRegistry()
        self.submitted = Counter("x2v_tasks_submitted", "tasks accepted by this API process", registry=self.registry)
        self.queue = Gauge("x2v_queue_tasks", "tasks in the queue by state", ["state"], registry=self.registry)
        self.finished = Gauge("x2v_worker_tasks_finished", "tasks this process's worker finished, by final state",
                              ["state"], registry=self.registry)
        self.batches = Gauge("x2v_worker_batches", "batches this process's worker ran", registry=self.registry)
        self.busy = Gauge("x2v_worker_busy", "1 while this process's worker runs a batch", registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        counts = self.service.queue.counts()
        for state in STATES:
            self.queue.labels(state).set(counts.get(state, 0))
        stats = self.service.stats
        if stats is not None:
            for state in FINAL:
                self.finished.labels(state).set(stats.finished.get(state, 0))
            self.batches.set(stats.batches)
            self.busy.set(int(stats.busy))
        return generate_latest(self.registry)
