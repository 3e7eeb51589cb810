"""The web page of `x2v serve` (x2v/server/static/index.html) in a real headless Chromium against real
``python -m x2v.server`` processes on loopback with a tiny random model: submit, watch the task list, play the
video, a 422 shown in the page, cancel (running and pending tasks), and the API key field.

Needs Debian's chromium and chromium-driver and the selenium package: without them these tests fail (not skip)."""

import time

import pytest
from browser import chromium_driver
from serving import start_server

from x2v.demo import write_tiny_model

WAIT_S = 60  # generous: two slow CI cores, a browser and the service on them
SLOW_STEPS = 50_000  # a task that runs for minutes (each tiny step takes milliseconds) until it is cancelled
KEY = "secret"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def model(folder):
    return write_tiny_model(folder / "t2v", "t2v")


@pytest.fixture(scope="module")
def server(model, folder):
    # --max_steps: room for a task slow enough to be cancelled by a click; the default config's 2 steps otherwise
    running = start_server(model, folder / "open", "--max_steps", str(SLOW_STEPS))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as http:
        yield http


@pytest.fixture(scope="module")
def keyed_server(model, folder):
    running = start_server(model, folder / "keyed", "--api_key", KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def driver():
    try:
        browser = chromium_driver()
    except RuntimeError as error:  # no chromium, chromedriver or selenium: a failure (not a skip), CI has them
        missing = str(error)
    else:
        missing = None
    if missing:
        pytest.fail(missing, pytrace=False)
    browser.set_page_load_timeout(WAIT_S)
    browser.set_script_timeout(WAIT_S)
    yield browser
    browser.quit()


# ---- helpers -----------------------------------------------------------------------------------------------------

PAGE_STATE = """
var m = document.getElementById('message');
return {message: m.textContent, kind: m.getAttribute('data-kind'), task: m.getAttribute('data-task-id'),
        http: m.getAttribute('data-http-status'),
        rows: Array.from(document.querySelectorAll('tr[data-task-id]')).map(function (tr) {
          var v = tr.querySelector('video.result');
          return [tr.getAttribute('data-task-id'), tr.getAttribute('data-status'),
                  tr.querySelector('td.progress').textContent, tr.querySelector('td.result').textContent,
                  v && {loaded: v.getAttribute('data-loaded'), error: v.getAttribute('data-error')}];
        })};
"""


def page_state(driver) -> dict:
    return driver.execute_script(PAGE_STATE)


def wait_page(driver, server, condition, what: str, timeout: float = WAIT_S):
    """Wait until ``condition(driver)`` is truthy (returns it); on timeout fail with the page's and the service's
    state."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page did not show {what} in {timeout} s\npage: {page_state(driver)}\n"
                             f"service log:\n{server.output()[-3000:]}") from None


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found else None


def attribute(driver, css: str, name: str):
    element = find(driver, css)
    return None if element is None else element.get_attribute(name)


def fill(driver, field_id: str, text) -> None:
    element = find(driver, f"#{field_id}")
    element.clear()
    if text != "":
        element.send_keys(str(text))


def submit(driver, server, **fields) -> dict:
    """Fill the form's fields (``""`` empties one), click Generate, wait for the answer in #message: its state."""
    for name, value in fields.items():
        fill(driver, name, value)
    find(driver, "#submit").click()

    def answered(d):
        state = page_state(d)
        return state if state["kind"] in ("ok", "error") else None

    return wait_page(driver, server, answered, "the submit's answer in #message")


def row_css(task_id: str) -> str:
    return f'tr[data-task-id="{task_id}"]'


def wait_status(driver, server, task_id: str, status: str, timeout: float = WAIT_S) -> None:
    wait_page(driver, server, lambda d: attribute(d, row_css(task_id), "data-status") == status,
              f"task {task_id} {status}", timeout)


def wait_video(driver, server, task_id: str):
    """Wait until the task's row is completed and its video has decoded its first frame; the video element."""
    wait_status(driver, server, task_id, "completed")
    css = f"{row_css(task_id)} video.result"
    wait_page(driver, server, lambda d: attribute(d, css, "data-loaded") == "1" or attribute(d, css, "data-error"),
              f"the video of task {task_id}")
    video = find(driver, css)
    assert video.get_attribute("data-error") is None, f"the browser could not play the video: {page_state(driver)}"
    return video


def open_page(driver, server) -> None:
    driver.get(server.url + "/")
    assert driver.title == "x2v"
    # the first task-list poll has answered: the list (maybe empty) is shown or its error is in #message
    wait_page(driver, server, lambda d: find(d, "tr[data-task-id]") is not None
              or attribute(d, "#empty", "hidden") is None or attribute(d, "#message", "data-kind") == "error",
              "the task list")


def check_video(driver, server, task_id: str, seed=None, prompt=None) -> None:
    video = wait_video(driver, server, task_id)
    size = driver.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", video)
    assert size == [64, 64]  # the server's configured size: the page sent no size
    assert find(driver, f"{row_css(task_id)} a.download").get_attribute("href").startswith("blob:")
    assert "done" in find(driver, f"{row_css(task_id)} td.progress").text
    with server.client(KEY if server.data_dir.name == "keyed" else None) as client:
        status = client.get(f"/v1/tasks/{task_id}/status").json()
    assert status["status"] == "completed"
    if seed is not None:
        assert status["request"]["seed"] == seed
    if prompt is not None:
        assert status["request"]["prompt"] == prompt
        assert find(driver, f"{row_css(task_id)} td.prompt").text == prompt


def wait_idle(client, timeout: float = WAIT_S) -> dict:
    """The worker has stopped working (a cancelled run ended): the service status says idle, nothing processing."""
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get("/v1/service/status").json()
        if answer["service_status"] == "idle" and answer["queue"]["processing"] == 0:
            return answer
        assert time.monotonic() < deadline, f"the service is still busy after {timeout} s: {answer}"
        time.sleep(0.05)


# ---- tests -------------------------------------------------------------------------------------------------------


def test_generate_validate_cancel(driver, server, client):
    open_page(driver, server)
    assert find(driver, "tr[data-task-id]") is None and find(driver, "#empty").is_displayed()

    # a video: the task id in #message is the new row's; the row completes and its video plays
    prompt = "a red fox runs through snow"
    answer = submit(driver, server, prompt=prompt, seed=7)
    assert answer["kind"] == "ok", answer
    first_id = answer["task"]
    assert first_id and first_id in answer["message"]
    check_video(driver, server, first_id, seed=7, prompt=prompt)
    assert [row[0] for row in page_state(driver)["rows"]] == [first_id]
    assert not find(driver, "#empty").is_displayed()

    # the server's 422 names the fields in the page; no task is made
    answer = submit(driver, server, infer_steps=0, target_height=65)
    assert answer["kind"] == "error" and answer["http"] == "422", answer
    lines = [line.text for line in driver.find_elements("css selector", "#message .line")]
    assert any(line.startswith("infer_steps:") for line in lines), lines
    assert any(line.startswith("target_height:") for line in lines), lines
    assert answer["task"] is None
    assert len(client.get("/v1/tasks/").json()["tasks"]) == 1
    # a field the page itself refuses: no request at all
    answer = submit(driver, server, prompt=" ", target_height="")
    assert answer["kind"] == "error" and answer["http"] is None and "prompt" in answer["message"], answer
    assert len(client.get("/v1/tasks/").json()["tasks"]) == 1

    # cancel: a running task (stopped at its next step) and one pending behind it (dropped)
    running = submit(driver, server, prompt=prompt, infer_steps=SLOW_STEPS)
    assert running["kind"] == "ok", running
    running_id = running["task"]
    wait_status(driver, server, running_id, "processing")
    pending = submit(driver, server, infer_steps=SLOW_STEPS - 1)  # other steps: not batched with the running one
    assert pending["kind"] == "ok", pending
    pending_id = pending["task"]
    wait_status(driver, server, pending_id, "pending")
    assert client.get(f"/v1/tasks/{running_id}/status").json()["status"] == "processing"

    for task_id in (pending_id, running_id):
        find(driver, f'{row_css(task_id)} button.cancel[data-task-id="{task_id}"]').click()
        wait_status(driver, server, task_id, "cancelled")
        wait_page(driver, server, lambda d, task_id=task_id: attribute(d, "#message", "data-task-id") == task_id
                  and attribute(d, "#message", "data-kind") == "ok", f"the cancel of {task_id} in #message")
        assert find(driver, f"{row_css(task_id)} button.cancel") is None
    wait_idle(client)
    for task_id in (pending_id, running_id):
        status = client.get(f"/v1/tasks/{task_id}/status").json()
        assert status["status"] == "cancelled", status
        assert status["result_url"] is None
    assert client.get("/v1/tasks/queue/status").json()["cancelled"] == 2
    # the newest first, as the server lists them; no error shown meanwhile
    assert [row[0] for row in page_state(driver)["rows"]] == [pending_id, running_id, first_id]
    assert attribute(driver, "#message", "data-kind") == "ok"


def test_api_key_field(driver, keyed_server):
    server = keyed_server
    from selenium.webdriver.common.keys import Keys

    # the page itself is public; its task list needs the key: a 401 line asks for it
    open_page(driver, server)
    wait_page(driver, server, lambda d: attribute(d, "#message", "data-http-status") == "401", "the 401 of the list")
    assert "API key" in find(driver, "#message").text
    assert find(driver, "tr[data-task-id]") is None

    # typing the key (and leaving the field) clears the error and the list answers
    key_field = find(driver, "#api_key")
    key_field.send_keys(KEY, Keys.TAB)
    wait_page(driver, server, lambda d: attribute(d, "#message", "data-kind") is None
              and find(d, "#empty").is_displayed(), "the (empty) task list after the key")

    # the key goes with the submit and with the video's download
    answer = submit(driver, server, prompt="a lighthouse at night", seed=3)
    assert answer["kind"] == "ok", answer
    check_video(driver, server, answer["task"], seed=3)

    # the key is kept in the browser: a reload works without typing it again
    driver.refresh()
    wait_video(driver, server, answer["task"])
    assert find(driver, "#api_key").get_attribute("value") == KEY
    assert attribute(driver, "#message", "data-kind") is None
