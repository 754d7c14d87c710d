"""The security headers in a real browser (issue #26): the page, Swagger UI (/docs) and ReDoc (/redoc) still
render under their Content-Security-Policy, with no CSP violation in the console, all offline.

Headless Chromium (Debian's chromium + chromium-driver, through Selenium) against a uvicorn server on 127.0.0.1
in a thread; untrained weights are enough. Skipped where Chromium is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver")
pytest.importorskip("selenium")
uvicorn = pytest.importorskip("uvicorn")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from ferkit.inference import Recognizer  # noqa: E402
from ferkit.serving import ServeSettings, create_app  # noqa: E402

TIMEOUT = 60  # seconds for any one wait: the CPU may be shared


@pytest.fixture(scope="module")
def url(weights: Path):
    app = create_app(ServeSettings(workers=1, warmup=False), recognizer=Recognizer(model=str(weights), device="cpu"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # loopback only, a free port chosen by the OS
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download anything
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


@pytest.mark.parametrize("path, rendered", [
    ("/", "document.getElementById('drop') && getComputedStyle(document.getElementById('drop')).display !== ''"),
    ("/docs", "document.querySelectorAll('.opblock').length >= 4"),   # Swagger UI lists the operations
    ("/redoc", "document.querySelectorAll('[data-section-id]').length >= 4"),  # ReDoc too
])
def test_pages_render_under_their_csp(browser, url: str, path: str, rendered: str) -> None:
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(url + path)
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.execute_script(f"return Boolean({rendered})"))
    violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    # What the policy may block is a load from elsewhere (ReDoc's "powered by" logo from cdn.redoc.ly): the page
    # works without it. Blocking this server's own files, inline code or eval would break the page.
    own = [m for m in violations if "inline" in m or "eval" in m or f"'{url}/" in m.split(" - ", 1)[-1]]
    assert not own, own
    assert all("'https://" in m or "'http://" in m for m in violations), violations
