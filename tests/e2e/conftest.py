"""Browser end-to-end fixtures: Debian's chromium driven by Python playwright, the app as a subprocess.

`playwright install` cannot download browsers on these machines, so the tests launch the system
chromium (`make browser` installs it). Without it the tests skip locally and FAIL when `CI` is set, so
CI cannot pass by silently skipping them.

The app runs exactly as a user starts it (`python app.py` from the repository root) on a free port,
offline, with its own FINETUNE_HOME; it is stopped (with its training workers) at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# `make screenshots` (UPDATE_SCREENSHOTS=1) refreshes the README's pictures; a plain test run writes
# them to tests/e2e/artifacts/ (git-ignored), so `make test` leaves the tree clean.
SCREENSHOTS = REPO / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") else \
    REPO / "tests" / "e2e" / "artifacts"
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("FINETUNE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _missing(reason: str):
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set: browser tests must run here; `make browser` installs chromium)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    path = chromium_path()
    if path is None:
        _missing("chromium is not installed (run `make browser`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright Python package is not installed")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path, home: Path):
        self.url, self.proc, self.log_path, self.home = url, proc, log_path, home

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-n:])


@pytest.fixture(scope="module")
def app_server(chromium_executable, tmp_path_factory):
    """`python app.py` on a free port, offline, FINETUNE_HOME in a temp folder; yields an AppServer."""
    home = tmp_path_factory.mktemp("e2e_home")
    log_path = home / "server.log"
    port = _free_port()
    env = dict(os.environ)
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE="1",
               FINETUNE_HOME=str(home), GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        # own process group: the training workers it spawns are stopped with it
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = AppServer(f"http://127.0.0.1:{port}/", proc, log_path, home)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with code {proc.returncode} before answering HTTP:\n"
                            f"{server.log_tail()}", pytrace=False)
            try:
                with urllib.request.urlopen(server.url, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"app.py did not answer on {server.url} within 120 s:\n{server.log_tail()}",
                            pytrace=False)
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)     # the group this fixture created (app + its workers)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    else:  # the app is gone; still stop any worker left in its group
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def browser(chromium_executable):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed e2e test: keep a full-page screenshot and attach the server log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    pg, server = item.funcargs.get("page"), item.funcargs.get("app_server")
    if server is None:
        return
    if pg is not None:
        shot = server.home / f"failure-{item.name}.png"
        try:
            pg.screenshot(path=str(shot), full_page=True)
            report.sections.append(("e2e", f"page at the failure: {shot}"))
        except Exception as exc:  # noqa: BLE001 - the browser may be what broke
            report.sections.append(("e2e", f"no failure screenshot: {exc}"))
    report.sections.append(("server log (last lines)", server.log_tail()))


@pytest.fixture
def page(browser, app_server):
    """A fresh browser context at 1280x800, recording uncaught JavaScript errors in `page.page_errors`."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, locale="en-US")
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.page_errors = []
    pg.on("pageerror", lambda exc: pg.page_errors.append(str(exc)))
    try:
        yield pg
    finally:
        context.close()
