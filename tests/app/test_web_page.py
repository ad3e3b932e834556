"""The web page (``GET /``) in headless Chromium, against a real server on the tiny model.

Chromium is driven over the Chrome DevTools Protocol on ``--remote-debugging-pipe``: JSON
messages ended by a NUL byte, written to the browser's fd 3 and read from its fd 4. That needs
nothing beyond the standard library and Debian's ``chromium``: no Selenium and no
``chromium-driver`` to keep in step with the browser, no debugging port to find, no websocket
framing to implement. The test skips where Chromium is absent, and fails under ``CI=true``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from nli.labels import LABELS
from tests.app.conftest import PAIRS, fill_adapters_dir
from tests.app.helpers import free_port, server_env, start_server, stop_server, wait_ready

KEY = "web-test-key"
SYNC_MAX_ROWS = 8  # larger uploads become jobs, so the page has to poll GET /evaluate/{job_id}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def find_chromium() -> str:
    """Debian's ``chromium``; skip without it, or fail under CI, which must install it."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("Chromium is not installed, and CI must run the web-page test (see .ci/run)")
    pytest.skip("Chromium is not installed (apt-get install chromium)")


class Browser:
    """A headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        # Chromium reads commands on fd 3 and writes answers on fd 4. The pipe ends are moved
        # above 9 first so that the shell's redirections cannot clobber one with the other.
        to_browser, self._write_fd = (_high_fd(fd) for fd in os.pipe())
        self._read_fd, from_browser = (_high_fd(fd) for fd in os.pipe())
        redirect = f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        argv = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                ["bash", "-c", redirect, "chromium", *argv],
                pass_fds=(to_browser, from_browser),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        os.close(to_browser)
        os.close(from_browser)
        self.log = log
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        # Paths whose 4xx/5xx answers a test provokes on purpose (the browser logs each one).
        self.expected_http_errors: set[str] = set()
        try:
            self.session = self._open_page()
        except BaseException:
            self.close()
            raise

    def _open_page(self) -> str:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        session = str(attached["sessionId"])
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1100, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        return session

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one command and wait for its answer, keeping the events that come meanwhile."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") != self._next_id:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return dict(reply["result"])

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._read_fd], [], [], remaining)[0]:
                raise TimeoutError(f"Chromium did not answer; its log:\n{self._log_tail()}")
            chunk = os.read(self._read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited; its log:\n{self._log_tail()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 30.0) -> Any:
        """Poll until ``expression`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        message = self.evaluate("document.getElementById('message').innerText")
        raise AssertionError(f"timed out waiting for {expression!r}; message area: {message!r}")

    def open(self, url: str) -> None:
        self.events.clear()
        self.expected_http_errors.clear()
        self.call("Page.navigate", {"url": url}, session=self.session)
        self.wait_for("document.body && document.body.dataset.ready === 'true'")

    def type(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text}, session=self.session)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element, which must be visible and enabled."""
        box = self.evaluate(
            f"""(() => {{
                const node = document.querySelector({json.dumps(selector)});
                node.scrollIntoView({{block: "center"}});
                const r = node.getBoundingClientRect();
                return {{x: r.x + r.width / 2, y: r.y + r.height / 2, disabled: node.disabled}};
            }})()"""
        )
        assert not box["disabled"], f"{selector} is disabled"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            event = {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1}
            self.call("Input.dispatchMouseEvent", event, session=self.session)

    def choose(self, selector: str, value: str) -> None:
        """Pick an option of a ``<select>`` as a user would: the value changes, then ``change``."""
        self.evaluate(
            f"""(() => {{
                const node = document.querySelector({json.dumps(selector)});
                node.value = {json.dumps(value)};
                node.dispatchEvent(new Event("change", {{bubbles: true}}));
            }})()"""
        )

    def upload(self, selector: str, path: Path) -> None:
        node = self.call(
            "Runtime.evaluate",
            {"expression": f"document.querySelector({json.dumps(selector)})"},
            session=self.session,
        )["result"]
        self.call(
            "DOM.setFileInputFiles",
            {"files": [str(path)], "objectId": node["objectId"]},
            session=self.session,
        )

    def screenshot(self, path: Path) -> Path:
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=self.session,
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def page_errors(self) -> list[str]:
        """Uncaught exceptions, console errors and browser-logged errors (CSP, failed loads)."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                path = urlsplit(entry.get("url", "")).path
                if entry.get("source") == "network" and path in self.expected_http_errors:
                    continue
                errors.append(f"{entry.get('url')}: {entry['text']}")
        return errors

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write_fd)
        os.close(self._read_fd)


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    binary = find_chromium()
    root = tmp_path_factory.mktemp("chromium")
    running = Browser(binary, root / "profile", root / "chromium.log")
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def server(
    browser: Browser,
    tmp_path_factory: pytest.TempPathFactory,
    adapter_store: Path,
    tiny_llama_dir: Path,
) -> Iterator[str]:
    """``nli-serve`` on the tiny model, default adapter beta, alpha loaded. It has an API key, so
    the page works only if it keeps to the non-admin routes. (It takes ``browser`` so that a
    missing Chromium skips before a server is started.)"""
    root = tmp_path_factory.mktemp("web")
    fill_adapters_dir(adapter_store, root / "adapters", ["alpha", "beta"])
    env = server_env(
        base_model=tiny_llama_dir,
        device="cpu",
        adapters_dir=root / "adapters",
        builtin_adapters_dir=root / "builtin",
        data_dir=root / "data",
        cache_dir=root / "cache",
        api_key=KEY,
        default_adapter="beta",
        eval_sync_max_rows=SYNC_MAX_ROWS,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(env, port=port, log=root / "server.log")
    try:
        wait_ready(url, process=process)
        auth = {"Authorization": f"Bearer {KEY}"}
        loaded = httpx.post(f"{url}/adapters", json={"name": "alpha"}, headers=auth)
        assert loaded.status_code == 200, loaded.text
        yield url
    finally:
        stop_server(process)


@pytest.fixture()
def page(browser: Browser, server: str) -> Iterator[Browser]:
    """The page, loaded, with its adapter list filled; no script error may happen on it."""
    browser.open(f"{server}/")
    yield browser
    assert browser.page_errors() == []


def jsonl_file(path: Path, rows: int) -> Path:
    """A labelled .jsonl file of ``rows`` test pairs, labels in turn."""
    lines = []
    for row in range(rows):
        premise, hypothesis = PAIRS[row % len(PAIRS)]
        line = {"premise": premise, "hypothesis": hypothesis, "label": LABELS[row % 3]}
        lines.append(json.dumps(line) + "\n")
    path.write_text("".join(lines))
    return path


def shown_scores(page: Browser) -> list[tuple[str, float]]:
    rows = page.evaluate(
        "[...document.querySelectorAll('#scores li')]"
        ".map(li => [li.dataset.label, Number(li.dataset.score)])"
    )
    return [(label, score) for label, score in rows]


def shown_confusion(page: Browser, model: str) -> tuple[list[list[int]], int]:
    """A confusion-matrix table as the page shows it: the 3x3 counts and the grand total."""
    cells, total = page.evaluate(
        f"""(() => {{
            const table = document.querySelector(
                '#eval-result table.confusion[data-model="{model}"]');
            const counts = [...table.querySelectorAll('tbody tr')]
                .map(tr => [...tr.querySelectorAll('td.cell')].map(td => Number(td.textContent)));
            return [counts, Number(table.querySelector('.grand-total').textContent)];
        }})()"""
    )
    return cells, total


def test_classify_shows_the_api_answer_and_follows_the_adapter_select(
    page: Browser, server: str
) -> None:
    adapters = page.evaluate("[...document.querySelectorAll('#adapter option')].map(o => o.value)")
    assert adapters == ["base", "alpha", "beta"]
    assert page.evaluate("document.getElementById('adapter').value") == "beta"  # the default

    premise, hypothesis = PAIRS[0]
    page.type("#premise", premise)
    page.type("#hypothesis", hypothesis)
    page.click("#classify-submit")
    page.wait_for("document.getElementById('classify-result').dataset.adapter === 'beta'")
    expected = httpx.post(
        f"{server}/classify", json={"premise": premise, "hypothesis": hypothesis}
    ).json()
    assert expected["adapter"] == "beta"
    beta = shown_scores(page)
    assert [label for label, _ in beta] == list(LABELS)
    assert sum(score for _, score in beta) == pytest.approx(1.0, abs=1e-4)
    assert [score for _, score in beta] == pytest.approx(
        [s["score"] for s in expected["scores"]], abs=1e-5
    )
    predicted = page.evaluate("document.getElementById('predicted-label').textContent")
    assert predicted == expected["label"]

    page.choose("#adapter", "alpha")
    page.wait_for("document.getElementById('classify-result').dataset.adapter === 'alpha'")
    expected = httpx.post(
        f"{server}/classify",
        json={"premise": premise, "hypothesis": hypothesis, "adapter": "alpha"},
    ).json()
    alpha = shown_scores(page)
    assert [score for _, score in alpha] == pytest.approx(
        [s["score"] for s in expected["scores"]], abs=1e-5
    )
    assert max(abs(a - b) for (_, a), (_, b) in zip(alpha, beta, strict=True)) > 1e-3


def test_evaluate_shows_metrics_and_confusion_matrices_of_base_and_adapter(
    page: Browser, server: str, tmp_path: Path
) -> None:
    data = jsonl_file(tmp_path / "pairs.jsonl", 6)
    page.choose("#adapter", "alpha")
    page.upload("#eval-file", data)
    page.click("#eval-compare")
    page.click("#evaluate-submit")
    page.wait_for("document.querySelectorAll('#eval-result table.confusion').length === 2")

    with open(data, "rb") as file:
        expected = httpx.post(
            f"{server}/evaluate",
            files={"file": ("pairs.jsonl", file)},
            data={"adapter": "alpha", "compare_base": "true"},
        ).json()
    for model, metrics in (("adapter", expected["metrics"]), ("base", expected["base"]["metrics"])):
        counts, total = shown_confusion(page, model)
        assert counts == metrics["confusion_matrix"]["counts"]
        assert total == sum(map(sum, counts)) == 6
    accuracy = page.evaluate("Number(document.getElementById('eval-accuracy').dataset.value)")
    assert accuracy == pytest.approx(expected["metrics"]["accuracy"])
    assert page.evaluate("document.getElementById('eval-comparison') !== null")

    page.type("#premise", PAIRS[1][0])
    page.type("#hypothesis", PAIRS[1][1])
    page.click("#classify-submit")
    page.wait_for("!document.getElementById('classify-result').hidden")
    shot = page.screenshot(tmp_path / "page.png")
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1100 and height > 900  # the whole page, longer than the viewport


def test_a_large_upload_becomes_a_job_that_the_page_follows(page: Browser, tmp_path: Path) -> None:
    rows = SYNC_MAX_ROWS + 4
    page.choose("#adapter", "base")
    page.upload("#eval-file", jsonl_file(tmp_path / "many.jsonl", rows))
    page.click("#evaluate-submit")
    page.wait_for("document.getElementById('eval-progress').dataset.status === 'succeeded'")
    page.wait_for("document.querySelector('#eval-result table.confusion') !== null")
    counts, total = shown_confusion(page, "adapter")
    assert total == sum(map(sum, counts)) == rows
    progress = page.evaluate("document.getElementById('eval-progress-text').textContent")
    assert f"{rows} / {rows} pairs" in progress


def test_api_errors_are_shown_as_text_never_as_markup(page: Browser, tmp_path: Path) -> None:
    markup = '<img src="x" onerror="window.injected = true">'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": markup}) + "\n")
    page.expected_http_errors |= {"/evaluate", "/classify"}
    page.upload("#eval-file", bad)
    page.click("#evaluate-submit")
    page.wait_for("!document.getElementById('message').hidden")
    message = page.evaluate("document.getElementById('message-text').textContent")
    assert "row 1" in message and "label" in message and markup in message
    meta = page.evaluate("document.getElementById('message-meta').textContent")
    assert "HTTP 400" in meta and "request " in meta
    assert page.evaluate("document.querySelector('#message img') === null")
    assert page.evaluate("window.injected === undefined")

    page.type("#premise", "   ")  # passes the browser's `required`, not the API's own check
    page.type("#hypothesis", "a hypothesis")
    page.click("#classify-submit")
    page.wait_for("document.getElementById('message').dataset.type === 'validation_error'")
    message = page.evaluate("document.getElementById('message-text').textContent")
    assert "premise" in message
