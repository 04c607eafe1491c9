"""Checks that a report page is self-contained and that every figure decodes."""

import base64
import html.parser
import io
import pathlib
import re
import shutil
import subprocess

import numpy as np
from matplotlib import image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def decode_png(data: bytes) -> np.ndarray:
    """A PNG's pixels; fails unless the bytes are a real, non-trivial image."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pixels = image.imread(io.BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0.01, "a blank image"
    return pixels


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src", "data", "srcset", "action"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def check_report(path: pathlib.Path, min_images: int) -> str:
    """Assert the page is one offline file whose figures all decode; return its text."""
    source = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(source)
    assert page.tags[:1] == ["html"] and "body" in page.tags
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert page.links == [], f"references outside the page: {page.links}"
    assert not re.search(r"url\(|@import|https?://", source), "a reference outside the page"
    assert len(page.images) >= min_images
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), f"an image that is not embedded: {src[:60]}"
        decode_png(base64.b64decode(src[len(prefix) :], validate=True))
    return " ".join(page.text)


def browser() -> str | None:
    """A headless-capable Chromium on this machine, if any."""
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def screenshot(path: pathlib.Path, out: pathlib.Path) -> np.ndarray:
    """Render the page in headless Chromium (no network) and return the screenshot's pixels."""
    cmd = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--proxy-server=127.0.0.1:9",
        "--window-size=1200,2400",
        f"--screenshot={out}",
        path.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return decode_png(out.read_bytes())
