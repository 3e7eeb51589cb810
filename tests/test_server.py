"""x2v serve as running processes on loopback (real uvicorn, real SQLite and redis-server, real torchrun): submit ->
progress -> result, cancel, a restart after SIGKILL, workers sharing a queue, batching, LoRAs per request, and every
validation and path case of docs/server.md."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from serving import SMALL_CONFIG, start_server, wait_for
from x2v.demo import write_tiny_model
from x2v.pipelines.video import read_mp4
from x2v.pipelines.wan import Pipeline

SMALL = {key: value for key, value in SMALL_CONFIG.items()}
# LightX2V's scripts/server/post.py body (its negative prompt shortened)
LIGHTX2V_POST = {"prompt": "Two anthropomorphic cats in comfy boxing gear fight on a spotlighted stage.",
                 "negative_prompt": "blurry", "image_path": "", "seed": 42,
                 "save_result_path": "./cat_boxing_seed42.mp4"}
SLOW = 100  # steps that keep a tiny task running for seconds


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def model(root) -> Path:
    return write_tiny_model(root / "t2v", "t2v")


@pytest.fixture(scope="module")
def loras(root, model) -> Path:
    """A LoRA folder with one LoRA (LightX2V's key names) on a few of the tiny DiT's layers."""
    folder = root / "loras"
    folder.mkdir()
    shapes = {}
    for shard in model.glob("diffusion_pytorch_model*.safetensors"):
        with safe_open(shard, "pt") as f:
            shapes.update({key: f.get_slice(key).get_shape() for key in f.keys()})
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for base in ("blocks.0.self_attn.q", "blocks.0.ffn.0", "blocks.1.cross_attn.o"):
        out_features, in_features = shapes[f"{base}.weight"]
        tensors[f"diffusion_model.{base}.lora_up.weight"] = torch.randn(out_features, 4, generator=g)
        tensors[f"diffusion_model.{base}.lora_down.weight"] = torch.randn(4, in_features, generator=g)
    save_file(tensors, folder / "style.safetensors")
    (root / "outside.safetensors").write_bytes((folder / "style.safetensors").read_bytes())
    return folder


@pytest.fixture(scope="module")
def server(root, model, loras):
    """The service with its worker: the tiny t2v model, batches of up to 4, the LoRA folder."""
    served = start_server(model, root / "main", "--max_batch", "4", "--lora_dir", str(loras))
    yield served
    assert served.stop() == 0, served.output()[-3000:]


@pytest.fixture(scope="module")
def api(root, loras):
    """An API process without a worker (no model): tasks stay queued. With an API key, small limits."""
    served = start_server(None, root / "api", "--no_worker", "--api_key", "secret", "--lora_dir", str(loras),
                          "--max_queue_size", "3", "--max_image_mb", "0.05", "--max_steps", "50")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def pipe(model):
    return Pipeline.from_pretrained(model, device="cpu", **SMALL)


def direct_frames(pipe: Pipeline, tmp_path: Path, **request) -> np.ndarray:
    """The frames of the mp4 a direct generate() call writes (one thread, as the service runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = pipe.generate(progress=False, save_result_path=tmp_path / "direct.mp4", **request)
    finally:
        torch.set_num_threads(threads)
    return read_mp4(out.path)[0]


def result_frames(client: httpx.Client, task_id: str, tmp_path: Path) -> np.ndarray:
    answer = client.get(f"/v1/tasks/{task_id}/result")
    assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{task_id}.mp4"
    path.write_bytes(answer.content)
    return read_mp4(path)[0]


def assert_same_video(actual: np.ndarray, expected: np.ndarray) -> None:
    """Decoded frames of two mp4s of the same video. libx264 does not code the same frames to the same bytes every
    time (seen in one process, with identical YUV input), and a batch's frames may differ from single runs' by one
    level here and there (tests/test_pipelines.py): on the tiny model's noise-like frames the two codings differ by
    ~0.5 level on average, where another video differs by tens."""
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(int) - expected)
    assert diff.mean() < 3, (diff.mean(), diff.max())


def submit(client: httpx.Client, **fields) -> str:
    answer = client.post("/v1/tasks/video", json=fields)
    assert answer.status_code == 200, answer.text
    return answer.json()["task_id"]


def worker_log_lines(*servers, pattern: str) -> list[str]:
    return [line for s in servers for line in s.output().splitlines() if re.search(pattern, line)]


# --- the main flow ----------------------------------------------------------------------------------------------


def test_lightx2v_client_submits_and_gets_the_video(server, pipe, tmp_path):
    """LightX2V's post.py body to its URL (trailing slash); the video is the one generate() makes with the
    server's config for every field the client left out (its infer_steps is not replaced by a schema default)."""
    with server.client() as client:
        answer = client.post("/v1/tasks/video/", json=LIGHTX2V_POST)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["task_status"] == "pending" and body["save_result_path"] == "cat_boxing_seed42.mp4"
        status = wait_for(client, body["task_id"])
        assert status["status"] == "completed", status
        assert status["result_url"] == f"/v1/tasks/{body['task_id']}/result" and status["attempts"] == 1
        assert status["request"] == {k: v for k, v in LIGHTX2V_POST.items() if k != "image_path"} | {
            "save_result_path": "cat_boxing_seed42.mp4"}
        frames = result_frames(client, body["task_id"], tmp_path)
        assert (server.data_dir / "results" / body["task_id"] / "cat_boxing_seed42.mp4").is_file()
        # LightX2V's check_status.py
        assert client.get("/v1/service/status").json()["model_cls"] == "wan2.1"
        assert body["task_id"] in [t["task_id"] for t in client.get("/v1/tasks/").json()["tasks"]]
        assert client.get("/v1/tasks/test_task_001/status").status_code == 404
    expected = direct_frames(pipe, tmp_path, prompt=LIGHTX2V_POST["prompt"], negative_prompt="blurry", seed=42)
    assert_same_video(frames, expected)


def test_progress_is_reported_and_streamed(server):
    with server.client() as client:
        task_id = submit(client, prompt="a dog runs", infer_steps=SLOW)
        events = []
        with client.stream("GET", f"/v1/tasks/{task_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["status"] == "completed"
        denoising = [e["progress"] for e in events if e["progress"].get("phase") == "denoise"]
        assert denoising and all(p["steps"] == SLOW for p in denoising)
        steps = [p["step"] for p in denoising]
        assert steps == sorted(steps) and len(set(steps)) > 1
        assert any("eta_s" in p and p["eta_s"] >= 0 for p in denoising)
        assert all(e["progress"]["elapsed_s"] >= 0 for e in events if e["status"] == "processing")
        metrics = client.get("/metrics").text
        assert re.search(r'x2v_queue_tasks\{state="completed"\} [1-9]', metrics)
        assert re.search(r"x2v_tasks_submitted_total [1-9]", metrics)


def test_cancel_a_queued_and_a_running_task(server):
    with server.client() as client:
        running = submit(client, prompt="a long one", infer_steps=SLOW, target_width=80)
        queued = submit(client, prompt="never runs", infer_steps=SLOW, target_width=96)
        wait_for(client, running, ("processing",), check=lambda s: s["progress"].get("step", 0) >= 2)
        assert client.delete(f"/v1/tasks/{queued}").json() == {"task_id": queued, "status": "cancelled"}
        assert client.delete(f"/v1/tasks/{running}").json()["status"] == "cancelled"
        # the worker stops at the next step: it is idle long before 100 steps could be done
        deadline = time.monotonic() + 20
        while client.get("/v1/service/status").json()["service_status"] == "busy":
            assert time.monotonic() < deadline, "the running task did not stop"
            time.sleep(0.05)
        assert client.get(f"/v1/tasks/{queued}/status").json()["attempts"] == 0
        for task_id in (running, queued):
            assert client.get(f"/v1/tasks/{task_id}/status").json()["status"] == "cancelled"
            assert client.get(f"/v1/tasks/{task_id}/result").status_code == 409
            assert client.delete(f"/v1/tasks/{task_id}").status_code == 409
            assert not (server.data_dir / "results" / task_id).exists()
        assert client.delete("/v1/tasks/nope").status_code == 404


def test_compatible_tasks_run_as_one_batch_with_the_frames_of_single_runs(server, pipe, tmp_path):
    prompts = {"a red car": 1, "a cat in the rain": 2, "a city at night": 3}
    with server.client() as client:
        blocker = submit(client, prompt="keeps the worker busy", infer_steps=30, target_width=80)
        wait_for(client, blocker, ("processing",))
        ids = {submit(client, prompt=p, seed=s, sample_guide_scale=float(s)): p for p, s in prompts.items()}
        for task_id in ids:
            assert wait_for(client, task_id)["status"] == "completed"
        frames = {task_id: result_frames(client, task_id, tmp_path) for task_id in ids}
    batch = worker_log_lines(server, pattern=r"running 3 task\(s\) as one batch")
    assert len(batch) == 1 and all(task_id in batch[0] for task_id in ids)
    for task_id, prompt in ids.items():
        expected = direct_frames(pipe, tmp_path, prompt=prompt, seed=prompts[prompt],
                                 sample_guide_scale=float(prompts[prompt]))
        assert_same_video(frames[task_id], expected)


def test_a_lora_per_request_switches_without_reloading(server, pipe, loras, tmp_path):
    with server.client() as client:
        plain = submit(client, prompt="a cat", seed=5)
        styled = submit(client, prompt="a cat", seed=5, lora_name="style.safetensors", lora_strength=0.5)
        plain_again = submit(client, prompt="a cat", seed=5)
        for task_id in (plain, styled, plain_again):
            assert wait_for(client, task_id)["status"] == "completed"
        plain_frames, styled_frames, again_frames = (result_frames(client, t, tmp_path)
                                                     for t in (plain, styled, plain_again))
    assert_same_video(again_frames, plain_frames)  # the two plain tasks may run as one batch
    assert np.abs(styled_frames.astype(int) - plain_frames).mean() > 10
    pipe.load_lora(loras / "style.safetensors", 0.5)
    try:
        assert_same_video(styled_frames, direct_frames(pipe, tmp_path, prompt="a cat", seed=5))
    finally:
        pipe.unload_loras()
    assert len(worker_log_lines(server, pattern="loaded in")) == 1  # one model load for all of it


def test_lightx2v_i2v_client_and_the_form_upload(root, pipe, tmp_path):
    """LightX2V's post_i2v.py: a base64 image posted to /v1/tasks/; and the same image as a multipart upload."""
    model = write_tiny_model(root / "i2v", "i2v")
    served = start_server(model, root / "i2v_data")
    picture = png(80, 48)
    try:
        with served.client() as client:
            json_task = client.post("/v1/tasks/", json={"prompt": "a white cat on a surfboard", "seed": 3,
                                                        "image_path": base64.b64encode(picture).decode()})
            form_task = client.post("/v1/tasks/video/form", data={"prompt": "a white cat on a surfboard", "seed": "3"},
                                    files={"image_file": ("cat.png", picture, "image/png")})
            ids = [answer.json()["task_id"] for answer in (json_task, form_task)]
            for task_id in ids:
                assert wait_for(client, task_id)["status"] == "completed"
            first, second = (result_frames(client, task_id, tmp_path) for task_id in ids)
    finally:
        served.stop()
    i2v = Pipeline.from_pretrained(model, device="cpu", **SMALL)
    (tmp_path / "cat.png").write_bytes(picture)
    expected = direct_frames(i2v, tmp_path, prompt="a white cat on a surfboard", seed=3, image=tmp_path / "cat.png")
    assert first.shape == expected.shape == (5, 48, 80, 3)  # the image's aspect ratio, 64x64's area
    assert_same_video(first, expected)  # the two tasks may run as one batch
    assert_same_video(second, expected)


def test_bad_service_flags_are_one_line_before_any_loading(capsys, tmp_path):
    from x2v.cli.main import main

    assert main(["serve", "--no_worker", "--queue", "mysql://db/x", "--data_dir", str(tmp_path)]) == 2
    assert "queue address 'mysql://db/x' is not understood" in capsys.readouterr().err
    assert main(["serve", "--worker", "--no_worker"]) == 2
    assert "leave nothing to run" in capsys.readouterr().err


# --- durability and workers ---------------------------------------------------------------------------------------


def test_a_restart_after_sigkill_loses_nothing(root, model):
    data = root / "restart"
    first = start_server(model, data)
    with first.client() as client:
        running = submit(client, prompt="interrupted", infer_steps=SLOW)
        queued = [submit(client, prompt=f"waiting {i}", seed=i) for i in range(2)]
        wait_for(client, running, ("processing",), check=lambda s: s["progress"].get("step", 0) >= 1)
    first.stop(signal.SIGKILL)
    second = start_server(model, data)
    try:
        with second.client() as client:
            for task_id in (running, *queued):
                status = wait_for(client, task_id, timeout=180)
                assert status["status"] == "completed", status
                assert client.get(f"/v1/tasks/{task_id}/result").status_code == 200
            assert client.get(f"/v1/tasks/{running}/status").json()["attempts"] == 2
        assert f"task {running} was running when this host's worker stopped" in second.output()
    finally:
        second.stop()


def test_a_task_running_at_a_crash_fails_with_the_reason_when_so_configured(root, model):
    data = root / "no_retry"
    first = start_server(model, data, "--max_attempts", "1")
    with first.client() as client:
        running = submit(client, prompt="interrupted", infer_steps=SLOW)
        wait_for(client, running, ("processing",))
    first.stop(signal.SIGKILL)
    second = start_server(model, data, "--max_attempts", "1")
    try:
        with second.client() as client:
            status = wait_for(client, running)
            assert status["status"] == "failed" and "given up after 1 run(s): its worker stopped" in status["error"]
    finally:
        second.stop()


def test_sigterm_puts_the_running_task_back_and_exits_0(root, model):
    from x2v.server.queue import open_queue

    data = root / "sigterm"
    served = start_server(model, data)
    with served.client() as client:
        running = submit(client, prompt="interrupted", infer_steps=SLOW)
        wait_for(client, running, ("processing",), check=lambda s: s["progress"].get("step", 0) >= 1)
    assert served.stop(signal.SIGTERM) == 0, served.output()[-2000:]
    assert f"task {running} put back in the queue" in served.output()
    with open_queue(None, data) as queue:
        task = queue.get(running)
    assert task.state == "pending" and task.worker is None and not (data / "results" / running).exists()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_workers_on_one_queue_run_every_task_once(root, model, backend, request):
    data = root / f"workers_{backend}"
    queue = ["--queue", request.getfixturevalue("redis_server")] if backend == "redis" else []
    api = start_server(None, data, "--no_worker", *queue)
    workers = [start_server(model, data, "--worker", "--max_batch", "1", *queue, http=False) for _ in range(2)]
    try:
        with api.client() as client:
            ids = [submit(client, prompt=f"video {i}", seed=i, infer_steps=4) for i in range(8)]
            statuses = [wait_for(client, task_id, timeout=180) for task_id in ids]
        assert all(s["status"] == "completed" and s["attempts"] == 1 for s in statuses), statuses
        ran = worker_log_lines(*workers, pattern=r"task \w+ completed")
        assert sorted(re.search(r"task (\w+) completed", line)[1] for line in ran) == sorted(ids)
        assert len({s["worker"] for s in statuses}) == 2  # both took part
    finally:
        for process in (*workers, api):
            assert process.stop() == 0, process.output()[-2000:]


# --- validation, paths, keys ----------------------------------------------------------------------------------------


def png(width: int = 48, height: int = 32) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


INVALID = [
    ({"target_video_length": 6}, "target_video_length", "4k+1"),
    ({"target_video_length": 245}, "target_video_length", "at most 241"),
    ({"target_height": 65}, "target_height", "multiple of 16"),
    ({"target_width": 4096}, "target_width", "1920"),
    ({"infer_steps": 0}, "infer_steps", "1 ... 50"),
    ({"infer_steps": 51}, "infer_steps", "--max_steps"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"sample_guide_scale": 1e9}, "sample_guide_scale", "less than or equal to 50"),
    ({"fps": "fast"}, "fps", "integer"),
    ({"infer_step": 4}, "infer_step", "Extra inputs are not permitted"),
    ({"save_result_path": "../escape.mp4"}, "save_result_path", "not a path"),
    ({"save_result_path": "/etc/cron.d/x.mp4"}, "save_result_path", "not a path"),
    ({"save_result_path": "sub/dir.mp4"}, "save_result_path", "not a path"),
    ({"save_result_path": "video.sh"}, "save_result_path", ".mp4"),
    ({"lora_name": "../outside.safetensors"}, "lora_name", "not a path"),
    ({"lora_name": "missing.safetensors"}, "lora_name", "available: style.safetensors"),
    ({"image_path": "/etc/passwd"}, "image_path", "paths and URLs are not taken"),
    ({"image_path": "https://example.com/cat.png"}, "image_path", "paths and URLs are not taken"),
    ({"image_path": "not base64 !"}, "image_path", "not base64"),
    ({"image_path": base64.b64encode(b"plain text, no picture").decode()}, "image_path", "not a readable image"),
    ({"image_path": base64.b64encode(png()[:60]).decode()}, "image_path", "not a readable image"),
    ({"image_path": "0" * 32}, "image_path", "no uploaded file"),
    ({"task_id": "../../x"}, "task_id", "A-Z a-z 0-9"),
    ({"use_prompt_enhancer": True}, "use_prompt_enhancer", "not implemented"),
    ({"target_shape": [480]}, "target_shape", "[height, width]"),
    ({"target_shape": [480, 100]}, "target_shape's target_width", "multiple of 16"),
]


@pytest.mark.parametrize("fields, field_name, message", INVALID, ids=[f"{f}-{m}" for _, f, m in INVALID])
def test_invalid_requests_get_422_naming_the_field(api, fields, field_name, message):
    with api.client("secret") as client:
        answer = client.post("/v1/tasks/video", json={"prompt": "a cat", **fields})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert any(field_name in ".".join(map(str, d["loc"])) + d["msg"] and message in d["msg"] for d in detail), detail
    assert "Traceback" not in answer.text and "/etc/passwd" not in json.dumps(detail[0].get("msg"))


def test_api_key_is_needed_everywhere_but_health_and_the_page(api):
    assert httpx.get(f"{api.url}/health").status_code == 200
    page = httpx.get(f"{api.url}/")
    assert page.status_code == 200 and "<form" in page.text
    assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]", page.text)  # nothing fetched from outside the machine
    for method, path in [("GET", "/v1/tasks/"), ("GET", "/v1/tasks/queue/status"), ("GET", "/v1/service/status"),
                         ("GET", "/metrics"), ("POST", "/v1/tasks/video"), ("DELETE", "/v1/tasks/x"),
                         ("GET", "/v1/tasks/x/result")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
            answer = httpx.request(method, api.url + path, headers=headers, json={"prompt": "a"})
            assert answer.status_code == 401, (method, path, headers)
    with api.client("secret") as client:
        assert client.get("/v1/tasks/queue/status").json()["max_queue_size"] == 3


def test_uploads_bodies_and_the_queue_limit(api):
    with api.client("secret") as client:
        upload = client.post("/v1/files/upload", files={"file": ("cat.png", png(), "image/png")})
        assert upload.status_code == 200
        file_id = upload.json()["file_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", file_id) and (api.data_dir / "uploads" / file_id).is_file()
        big = client.post("/v1/files/upload", files={"file": ("big.png", png(400, 400), "image/png")})
        assert big.status_code == 413
        garbage = client.post("/v1/files/upload", files={"file": ("x.png", b"\x89PNG garbage", "image/png")})
        assert garbage.status_code == 422 and "not a readable image" in garbage.text
        assert client.post("/v1/tasks/video", content=b"{not json").status_code == 422
        assert client.post("/v1/tasks/video", content=b"x" * (3 << 20)).status_code == 413
        accepted = [client.post("/v1/tasks/video", json={"prompt": "a cat", "image_path": file_id}),
                    client.post("/v1/tasks/video", json={"prompt": "a dog", "task_id": "mine-1",
                                                         "image_path": base64.b64encode(png()).decode()}),
                    client.post("/v1/tasks/video/form", data={"prompt": "a bird", "seed": "3", "infer_steps": "4"},
                                files={"image_file": ("bird.png", png(), "image/png")})]
        assert [a.status_code for a in accepted] == [200, 200, 200], [a.text for a in accepted]
        form_task = client.get(f"/v1/tasks/{accepted[2].json()['task_id']}/status").json()["request"]
        assert form_task["seed"] == 3 and form_task["infer_steps"] == 4 and len(form_task["image_path"]) == 32
        assert client.post("/v1/tasks/video", json={"prompt": "a fish"}).status_code == 429
        assert client.delete("/v1/tasks/mine-1").status_code == 200
        assert client.post("/v1/tasks/video", json={"prompt": "a fish", "task_id": "mine-1"}).status_code == 409


# --- many GPUs ------------------------------------------------------------------------------------------------------


def test_torchrun_serves_with_rank0_handing_tasks_to_every_rank(root, model, pipe, tmp_path):
    """Two ranks with CFG parallel (gloo on the CPU): rank 0 serves, both run every task; the same video."""
    config = {**SMALL_CONFIG, "parallel": {"cfg_p_size": 2}}
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "x2v.server")
    served = start_server(model, root / "torchrun", config=config, command=torchrun, timeout=180)
    try:
        with served.client() as client:
            ids = [submit(client, prompt="a cat", seed=7), submit(client, prompt="a dog", seed=8)]
            for task_id in ids:
                assert wait_for(client, task_id, timeout=180)["status"] == "completed"
            frames = [result_frames(client, task_id, tmp_path) for task_id in ids]
        assert "2 ranks = CFG 2" in served.output()
    finally:
        served.stop()  # torchrun signals every rank and ends with a status of its own
    assert_same_video(frames[0], direct_frames(pipe, tmp_path, prompt="a cat", seed=7))
