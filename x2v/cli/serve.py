"""``x2v serve`` and ``python -m x2v.server``: load the model once, then serve it (docs/server.md).

One process by default: the HTTP API (uvicorn) and a worker thread holding the pipeline. ``--worker`` runs only a
worker (no HTTP; another process serves the API on the same queue), ``--no_worker`` only the API (no model).
Under ``torchrun`` rank 0 serves and every rank runs each batch together (the ``parallel`` settings).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """LightX2V's server flags (``python -m lightx2v.server``) and x2v's."""
    model = parser.add_argument_group("model (as x2v generate)")
    model.add_argument("--model_path", help="model folder or DiT file (required unless --no_worker)")
    model.add_argument("--model_cls", help="default: read from the weights")
    model.add_argument("--task", help="default: read from the weights")
    model.add_argument("--config_json", help="LightX2V-style config: the defaults of every request")
    model.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    http = parser.add_argument_group("service")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                          "only; 0.0.0.0 for every network, with --api_key)")
    http.add_argument("--port", type=int, default=8000, help="default 8000")
    http.add_argument("--data_dir", default="x2v-data", help="the queue, uploads and results (default ./x2v-data)")
    http.add_argument("--queue", metavar="URL", help="'sqlite' (DATA_DIR/queue.sqlite3, default) or "
                                                     "redis://host:6379/0 for API and workers on several hosts")
    http.add_argument("--lora_dir", help="LoRA files a request may name in lora_name")
    http.add_argument("--max_queue_size", type=int, default=100, help="pending + running tasks before 429 "
                                                                      "(default 100)")
    http.add_argument("--max_batch", type=int, default=4, help="compatible tasks denoised together (default 4)")
    http.add_argument("--api_key", default=os.environ.get("X2V_API_KEY"),
                      help="every endpoint but /health and the page needs 'Authorization: Bearer KEY' "
                           "(default: $X2V_API_KEY; none: open)")
    http.add_argument("--worker", action="store_true", help="run a worker only, no HTTP (with --queue redis://... "
                                                            "or a shared --data_dir)")
    http.add_argument("--no_worker", action="store_true", help="serve the API only, no model (workers elsewhere)")
    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max_steps", type=int, default=100, help="infer_steps a request may ask (default 100)")
    limits.add_argument("--max_frames", type=int, default=241, help="target_video_length (default 241)")
    limits.add_argument("--max_size", type=int, default=1920, help="target_height / target_width (default 1920)")
    limits.add_argument("--max_image_mb", type=float, default=16, help="uploaded image size (default 16 MB)")
    limits.add_argument("--max_attempts", type=int, default=3,
                        help="runs of a task whose worker died before it is marked failed (default 3; 1: a task "
                             "running when the service stopped is failed with that reason, not run again)")
    limits.add_argument("--lease_s", type=float, default=60, help="seconds a dead worker holds its tasks on a "
                                                                  "shared queue (default 60)")
    parser.add_argument("--verbose", action="store_true", help="log every request")


def serve(args: argparse.Namespace) -> int:
    from x2v.server.queue import open_queue
    from x2v.server.schema import Limits
    from x2v.runtime.parallel import launched_rank
    from x2v.server.worker import Worker, follow

    logging.basicConfig(level=logging.INFO, format="x2v serve: %(asctime)s %(levelname)s %(message)s")
    if args.worker and args.no_worker:
        raise ValueError("--worker (no HTTP) and --no_worker (no model) leave nothing to run; choose one")
    if not args.worker:  # before the model loads, not after
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as error:
            raise ValueError(f"x2v serve needs its HTTP parts ({error.name} is missing): pip install 'x2v[serve]'"
                             ) from None
    if args.max_batch < 1 or args.max_queue_size < 1:
        raise ValueError("--max_batch and --max_queue_size must be 1 or more")
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lora_dir = Path(args.lora_dir).resolve() if args.lora_dir else None
    if lora_dir is not None and not lora_dir.is_dir():
        raise ValueError(f"--lora_dir {lora_dir}: no such folder")

    # The queue first: a wrong --queue is said before minutes of loading. Under torchrun rank 0 alone uses it.
    queue = open_queue(args.queue, data_dir, lease_s=args.lease_s, max_attempts=args.max_attempts) \
        if launched_rank() == 0 else None
    pipe, layout, size_multiple = None, None, 16
    if not args.no_worker:
        pipe, layout = load_pipeline(args)
        if layout is not None and not layout.main:
            follow(pipe, layout.share)  # every batch rank 0 takes, until it stops
            return 0
        from x2v.pipelines.config import model_class

        size_multiple = model_class(pipe.model_cls).size_multiple
    for task_id in queue.recover_dead_local_workers():
        log.info("task %s was running when this host's worker stopped: queued again", task_id)
    worker = None
    if pipe is not None:
        worker = Worker(pipe, queue, data_dir, lora_dir=lora_dir, max_batch=args.max_batch,
                        share=layout.share if layout is not None else None)
    if args.worker:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: worker.stop())
        log.info("worker %s taking tasks from %s", worker.id, args.queue or data_dir / "queue.sqlite3")
        worker.run()
        return 0
    limits = Limits(max_steps=args.max_steps, max_frames=args.max_frames, max_size=args.max_size,
                    size_multiple=size_multiple, max_image_bytes=int(args.max_image_mb * 2**20))
    return run_http(args, queue, data_dir, limits, lora_dir, worker, pipe)


def load_pipeline(args: argparse.Namespace):
    from x2v.pipelines.settings import resolve_settings
    from x2v.pipelines.wan import Pipeline, default_device
    from x2v.runtime import parallel

    flags = {key: getattr(args, key) for key in ("model_path", "model_cls", "task") if getattr(args, key)}
    settings = resolve_settings(flags=flags, config_json=args.config_json)
    for warning in settings.warnings:
        log.warning(warning)
    layout = parallel.start(settings.parallel, default_device(args.device))
    if layout is not None and layout.main:
        log.info(layout.describe())
    pipe = Pipeline.load(settings, device=args.device, layout=layout)
    log.info("model %s, task %s, %d DiT(s) on %s, loaded in %.1f s", pipe.model_cls, pipe.task, len(pipe.dits),
             pipe.device, pipe.load_seconds)
    return pipe, layout


def run_http(args, queue, data_dir: Path, limits, lora_dir, worker, pipe) -> int:
    import uvicorn

    from x2v.server.app import Service, create_app

    QuietStop = _uvicorn_server()

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api_key: anyone who reaches this port can use the GPU", args.host)
    model = {}
    if pipe is not None:
        model = {"model_cls": pipe.model_cls, "task": pipe.task,
                 "model": Path(pipe.settings.model_path).name if pipe.settings.model_path else None}
    service = Service(queue=queue, data_dir=data_dir, limits=limits, max_queue_size=args.max_queue_size,
                      lora_dir=lora_dir, api_key=args.api_key, model=model, worker=worker)
    thread = None
    if worker is not None:
        thread = threading.Thread(target=worker.run, name="x2v-worker", daemon=True)
        thread.start()
    log.info("serving on http://%s:%d (data in %s)", args.host, args.port, data_dir)
    server = QuietStop(uvicorn.Config(create_app(service), host=args.host, port=args.port,
                                      log_level="info" if args.verbose else "warning"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, server.handle_exit)
    try:
        server.run()
    finally:
        if thread is not None:  # a running batch stops at its next step and goes back to the queue
            worker.stop()
            thread.join(timeout=60)
        queue.close()
    return 0


def _uvicorn_server():
    import uvicorn

    class QuietStop(uvicorn.Server):
        """uvicorn, but a SIGTERM / SIGINT ends it with exit status 0 once the worker has put its running tasks back
        (uvicorn itself raises the signal again after its shutdown, which would end the process before that)."""

        @contextmanager
        def capture_signals(self):
            yield

    return QuietStop


def main(argv: list[str] | None = None) -> int:
    """``python -m x2v.server``: LightX2V's ``python -m lightx2v.server`` flags."""
    from x2v.cli.main import run_command

    parser = argparse.ArgumentParser(prog="python -m x2v.server", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    return run_command(serve, parser.parse_args(argv))
