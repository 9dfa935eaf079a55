"""The inference service: OpenAI-compatible, base and adapters side by side from one copy of the
weights, requests that arrive together generated together, and every bad input answered clearly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from conftest import NAME, free_port, run_cli, wait_for_http

from engine.data.identity import DEFAULT_ANSWER

IDENTITY = DEFAULT_ANSWER.format(name=NAME)
KEY = "sk-test-key"
ASK = [{"role": "user", "content": "请做一下自我介绍"}]


@pytest.fixture(scope="module")
def server(tiny_model, trained_run):
    import uvicorn

    from engine.serve.scheduler import ModelHost, Scheduler
    from engine.serve.server import build_app

    host = ModelHost(str(tiny_model), template="internlm2_chat")
    host.add_adapter("tuned", str(trained_run))
    # the service's own scheduling: no batching window; requests sent as a group wait for each other
    app = build_app(host, api_key=KEY, scheduler=Scheduler(host))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", host=host, sched=app.state.scheduler, run=trained_run)
    srv.should_exit = True
    thread.join(10)


def auth(extra: dict | None = None) -> dict:
    return {"Authorization": f"Bearer {KEY}", **(extra or {})}


def post(server, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", headers=headers if headers is not None else auth(),
                      content=raw if raw is not None else json.dumps(body), timeout=60)


def test_openai_client_streams_base_and_adapter_answers(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    assert {m.id for m in client.models.list()} == {"base", "tuned"}

    def stream(model):
        chunks = list(client.chat.completions.create(model=model, messages=ASK, stream=True, temperature=0))
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks

    tuned, chunks = stream("tuned")
    assert tuned == IDENTITY
    assert len(chunks) > 4 and chunks[-1].choices[0].finish_reason == "stop"
    base, _ = stream("base")
    assert base != tuned and not base.startswith("我是")
    full = client.chat.completions.create(model="tuned", messages=ASK, temperature=0)
    assert full.choices[0].message.content == IDENTITY and full.usage.completion_tokens > 0


def test_base_and_tuned_requested_together_are_generated_in_one_batch(server):
    """The two sides of a comparison carry one X-Tunedeck-Group (as the app and the web page send them):
    one batch of two rows, though the second arrives a moment after the first."""
    before = dict(server.sched.stats)
    answers = {}

    def ask(model):
        r = post(server, {"model": model, "messages": ASK, "temperature": 0, "max_tokens": 40},
                 headers=auth({"X-Tunedeck-Group": "cmp-1/2"}))
        answers[model] = r.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("base", "tuned")]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for t in threads:
        t.join(60)
    assert answers["tuned"] == IDENTITY and answers["base"] != IDENTITY
    assert server.sched.stats["batches"] == before["batches"] + 1        # one batch, two rows
    assert server.sched.stats["max_rows"] >= 2
    assert server.sched.stats["group_waits_timed_out"] == before["group_waits_timed_out"]


@pytest.mark.parametrize("value", ["cmp", "cmp/1", "cmp/x", "/2", "cmp/65"])
def test_a_malformed_group_header_is_a_400_naming_it(server, value):
    r = post(server, {"model": "base", "messages": ASK}, headers=auth({"X-Tunedeck-Group": value}))
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(f"X-Tunedeck-Group: {value!r} is not ID/N")


def test_a_request_starts_at_once_and_a_group_waits_only_for_its_own():
    """Scheduling alone (a host that records its batches): an ungrouped request is not held back for
    others (no window), one of a group waits for the rest of its group, and a group whose other member
    never comes goes alone once group_wait_s has passed."""
    from engine.serve.generation import GenerationParams
    from engine.serve.scheduler import GenRequest, Scheduler

    batches: list[list[str]] = []
    done = threading.Event()

    class Host:
        def run_batch(self, reqs):
            batches.append([r.model for r in reqs])
            for r in reqs:
                r.emit(("done", "stop", {}))

    def req(name, group=None):
        return GenRequest(name, [1], GenerationParams(max_new_tokens=1), set(),
                          emit=lambda item: done.set(), group=group)

    sched = Scheduler(Host(), group_wait_s=60)
    try:
        t0 = time.monotonic()
        sched.submit(req("alone"))
        assert done.wait(30) and time.monotonic() - t0 < 30          # not held for group_wait_s (60 s)
        done.clear()
        sched.submit(req("a", ("g", 2)))
        time.sleep(0.3)
        assert batches == [["alone"]]                                  # waiting for its partner
        sched.submit(req("b", ("g", 2)))
        assert done.wait(30)
        time.sleep(0.1)
        assert batches == [["alone"], ["a", "b"]]
    finally:
        sched.close()
    sched = Scheduler(Host(), group_wait_s=0.2)
    try:
        done.clear()
        sched.submit(req("lonely", ("h", 2)))
        assert done.wait(30)
        assert batches[-1] == ["lonely"] and sched.stats["group_waits_timed_out"] == 1
    finally:
        sched.close()


@pytest.mark.parametrize("body, raw, status, expect", [
    ({"model": "nope", "messages": ASK}, None, 404, "The model 'nope' does not exist"),
    (None, b"{not json", 400, "not valid JSON"),
    ({"model": "base", "messages": ASK, "temperature": "hot"}, None, 400, "temperature"),
    ({"model": "base", "messages": []}, None, 400, "messages"),
    ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, None, 400, "messages.0.role"),
    ({"model": "base", "messages": ASK, "max_tokens": 0}, None, 400, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "你好" * 3000}]}, None, 400, "context is 2048 tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, 400, "image_url"),
])
def test_bad_requests_get_openai_style_errors(server, body, raw, status, expect):
    r = post(server, body, raw=raw)
    assert r.status_code == status
    err = r.json()["error"]
    assert expect in err["message"] or expect == err.get("param")
    assert err["type"]


def test_api_key_is_required(server):
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(server, {"model": "base", "messages": ASK}, headers={}).status_code == 401
    assert httpx.get(f"{server.url}/health", headers=auth()).json()["status"] == "ok"
    assert httpx.get(f"{server.url}/").status_code == 200               # the page itself; it asks for the key


def test_client_that_disconnects_stops_its_generation(server):
    before = server.sched.stats["cancelled"]
    body = {"model": "base", "messages": ASK, "stream": True, "max_tokens": 1900, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=auth(), json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    t0 = time.time()
    while (server.sched.stats["busy"] or server.sched.stats["cancelled"] == before) and time.time() - t0 < 20:
        time.sleep(0.05)
    assert server.sched.stats["cancelled"] == before + 1
    assert not server.sched.stats["busy"]
    assert post(server, {"model": "tuned", "messages": ASK, "temperature": 0}).status_code == 200


def test_an_exception_in_generation_fails_that_request_only(server, monkeypatch):
    real = server.host._run_batch
    calls = {"n": 0}

    def flaky(reqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated CUDA error")
        return real(reqs)

    monkeypatch.setattr(server.host, "_run_batch", flaky)
    r = post(server, {"model": "base", "messages": ASK})
    assert r.status_code == 500 and "simulated CUDA error" in r.json()["error"]["message"]
    ok = post(server, {"model": "tuned", "messages": ASK, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == IDENTITY


def test_adapters_are_added_and_removed_while_serving(server):
    r = httpx.post(f"{server.url}/v1/adapters", headers=auth(), json={"name": "again", "path": str(server.run)})
    assert r.status_code == 200 and r.json()["template"] == "internlm2_chat"
    models = {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=auth()).json()["data"]}
    assert models == {"base", "tuned", "again"}
    r = post(server, {"model": "again", "messages": ASK, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == IDENTITY
    assert httpx.delete(f"{server.url}/v1/adapters/again", headers=auth()).status_code == 200
    assert post(server, {"model": "again", "messages": ASK}).status_code == 404
    bad = httpx.post(f"{server.url}/v1/adapters", headers=auth(), json={"name": "x", "path": "/no/such/dir"})
    assert bad.status_code == 400 and "/no/such/dir" in bad.json()["error"]["message"]
    assert httpx.delete(f"{server.url}/v1/adapters/base", headers=auth()).status_code == 404


def test_chat_cli_talks_to_the_service(server, capsys):
    assert run_cli("chat", "tuned", "--url", server.url, "--api-key", KEY, "--prompt", "请做一下自我介绍") == 0
    assert capsys.readouterr().out.strip() == IDENTITY
    assert run_cli("chat", "nope", "--url", server.url, "--api-key", KEY, "--prompt", "hi") == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_serve_binds_loopback_and_shuts_down_cleanly_on_sigterm(tiny_model, trained_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(tiny_model), "--adapter",
                             f"tuned={trained_run}", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", 120, "the service")
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert [line.split()[3] for line in listening.splitlines()] == [f"127.0.0.1:{port}"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stdout.read()


def test_web_page_compare_mode_streams_two_answers(server, tmp_path):
    """Headless Chromium (Debian's chromium + chromedriver, driven by selenium) types one prompt in
    compare mode and sees the base and the tuned answers stream into two columns."""
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(server.url + "/")
        key = driver.find_element(By.ID, "apikey")
        key.send_keys(KEY)
        driver.execute_script("loadModels()")
        WebDriverWait(driver, 20).until(
            lambda d: d.execute_script("return document.getElementById('right').options.length") == 2)
        assert driver.execute_script("return [left.value, right.value]") == ["base", "tuned"]
        driver.execute_script("""
            window.updates = {logLeft: 0, logRight: 0};
            for (const id of ['logLeft', 'logRight']) {
              new MutationObserver((ms) => { window.updates[id] += ms.length; })
                .observe(document.getElementById(id), {childList: true, subtree: true, characterData: true});
            }""")
        driver.find_element(By.ID, "prompt").send_keys("请做一下自我介绍")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.querySelectorAll('.msg.assistant[data-done=\"1\"]').length") == 2)
        left, right = driver.execute_script(
            "return ['logLeft','logRight'].map(id => document.querySelector('#' + id + ' .msg.assistant').textContent)")
        updates = driver.execute_script("return window.updates")
        driver.save_screenshot(str(tmp_path / "compare.png"))
    finally:
        driver.quit()
    assert right == IDENTITY
    assert left and left != IDENTITY
    assert updates["logLeft"] > 3 and updates["logRight"] > 3          # streamed, not set once


def test_a_big_request_is_413_and_tokenizing_never_blocks_health(server, monkeypatch):
    big = json.dumps({"model": "base", "messages": [{"role": "user", "content": "x" * (33 << 20)}]})
    r = post(server, None, raw=big.encode())
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and "32 MiB" in r.json()["error"]["message"]
    # the prompt's tokenizing waits until /health has answered: were it on the event loop, /health could not
    health_answered = threading.Event()
    real = server.host.encode

    def slow_encode(*a, **kw):
        assert health_answered.wait(20), "/health did not answer while a prompt was being tokenized"
        return real(*a, **kw)

    monkeypatch.setattr(server.host, "encode", slow_encode)
    answer: dict = {}
    t = threading.Thread(target=lambda: answer.update(r=post(server, {"model": "base", "messages": ASK,
                                                                      "max_tokens": 4})))
    t.start()
    time.sleep(0.3)
    assert httpx.get(f"{server.url}/health", headers=auth(), timeout=10).status_code == 200
    health_answered.set()
    t.join(60)
    assert answer["r"].status_code == 200


def test_unknown_routes_and_methods_answer_openai_style_json(server):
    r = httpx.get(f"{server.url}/v1/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/chat/completions", headers=auth())
    assert r.status_code == 405 and r.json()["error"]["message"] == "GET is not allowed on /v1/chat/completions"


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401


def test_cancelled_counts_each_disconnect_once(server):
    before = server.sched.stats["cancelled"]
    body = {"model": "base", "messages": ASK, "stream": True, "max_tokens": 1900, "temperature": 0}
    for _ in range(3):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=auth(), json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        t0 = time.time()
        while server.sched.stats["busy"] and time.time() - t0 < 20:
            time.sleep(0.05)
    for _ in range(3):                        # complete streams are not counted as cancelled
        assert post(server, {**body, "max_tokens": 8}).status_code == 200
    time.sleep(0.5)
    assert server.sched.stats["cancelled"] == before + 3


def test_serve_on_a_busy_port_says_so_before_loading_the_model(tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "engine.cli", "serve", str(tiny_model), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: --port: 127.0.0.1:{port} is already in use (another service?); "
                                "choose another --port")
    assert "loading" not in r.stderr                          # refused before the model was loaded


def test_a_corrupt_adapter_is_a_400_naming_it(server, tmp_path):
    import shutil

    from engine.train.checkpoint import resolve_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(resolve_checkpoint(str(server.run)), bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])        # torn in half
    r = httpx.post(f"{server.url}/v1/adapters", headers=auth(), json={"name": "bad", "path": str(bad)}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(f"{bad}: cannot read the adapter")
    assert "bad" not in {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=auth()).json()["data"]}
