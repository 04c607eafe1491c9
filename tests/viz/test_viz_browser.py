"""``paramarket viz`` in a headless browser: the live page steps the market, the replay's
slider moves through a run folder's rounds.

Needs the viz extra (Solara), Python playwright and Debian's Chromium at /usr/bin/chromium
(``pip install ".[viz-test]"``, ``apt-get install chromium``; never ``playwright install``):
skipped, with the reason, where one is missing. The test installs nothing.
"""

import contextlib
import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from paramarket_jax.viz import has_solara

CHROMIUM = pathlib.Path("/usr/bin/chromium")
ARGS = [
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
]
SMALL = ["--set", "train.rounds=3", "--set", "train.local_steps=2"]
START_S = 240  # the server's start and the first step (compiling) on two busy cores

pytestmark = [
    pytest.mark.skipif(not has_solara(), reason='needs the viz extra: pip install ".[viz]"'),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason='needs Python playwright: pip install ".[viz-test]" (with the system Chromium)',
    ),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"needs Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paramarket(*args) -> list[str]:
    return [sys.executable, "-m", "paramarket_jax.cli.main", *args]


@contextlib.contextmanager
def server(*args):
    """``paramarket viz ARGS --port P`` started as a subprocess; yields its URL once it
    answers, and stops it by its pid (SIGTERM, then SIGKILL)."""
    port = free_port()
    proc = subprocess.Popen(
        paramarket("viz", *args, "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"paramarket viz exited {proc.returncode}: {proc.stdout.read()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.5)
        else:
            pytest.fail("paramarket viz did not answer")
        yield f"http://127.0.0.1:{port}/"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(START_S * 1000)
        yield page
        b.close()


def drawn(page, panel: str) -> bool:
    """The panel's figure is an image the browser decoded."""
    img = page.locator(f".pm-{panel} img").first
    return img.evaluate("i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100")


def non_blank_png(path: pathlib.Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(path).convert("L"), np.float64)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50


def test_live_page_steps(browser, tmp_path):
    """Step three times: the round counter goes to 3 of 3, the welfare panel is drawn, Step
    is then disabled (the market has run its rounds)."""
    with server("paper_two_agent", *SMALL) as url:
        page = browser
        page.goto(url)
        step = page.get_by_role("button", name="Step")
        step.wait_for()
        page.get_by_text("round 0 of 3").wait_for()
        for k in range(1, 4):
            step.click()
            page.get_by_text(f"round {k} of 3").wait_for()
        assert drawn(page, "welfare") and drawn(page, "who-bought-from-whom")
        assert page.locator(".agents-table tbody tr").count() == 2
        step.click()  # past train.rounds: the model stops running and Step is disabled
        page.wait_for_function(
            "() => [...document.querySelectorAll('button')].some("
            "b => b.innerText.trim() === 'STEP' && b.disabled)"
        )
        shot = tmp_path / "live.png"
        page.screenshot(path=str(shot))
    non_blank_png(shot)


def test_replay_slider(browser, tmp_path):
    """A run folder written by ``paramarket run``, replayed: the slider moves the round."""
    out = tmp_path / "run"
    subprocess.run(
        paramarket("run", "paper_two_agent", *SMALL, "--out", str(out), "--no-report", "--quiet"),
        check=True,
        capture_output=True,
    )
    with server(str(out)) as url:
        page = browser
        page.goto(url)
        page.get_by_text("round 3 of 3").wait_for()
        slider = page.get_by_role("slider").first
        slider.focus()
        page.keyboard.press("Home")
        page.get_by_text("round 0 of 3").wait_for()
        assert page.get_by_text("no round yet").count() > 0
        page.keyboard.press("ArrowRight")
        page.get_by_text("round 1 of 3").wait_for()
        assert drawn(page, "welfare")
        shot = tmp_path / "replay.png"
        page.screenshot(path=str(shot))
    non_blank_png(shot)
