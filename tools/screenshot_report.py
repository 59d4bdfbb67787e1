"""Render a ckapipe HTML report in headless Chromium: PNG screenshots and layout measurements.

    python tools/screenshot_report.py results/demo/report.html --out-dir shots
    python tools/screenshot_report.py REPORT.html --out-dir docs/screenshots --colors 256

For each width (CSS pixels; default 390, a phone, and 1280, a desktop) it loads the page once
with a small measuring script added to a temporary copy (the report itself stays script-free)
and reads back, through ``--dump-dom``, the page's scroll width and height and whether every
image decoded; then it takes a screenshot as tall as the page (at most ``--max-height``), and
prints one JSON line per width. Chromium's windows are at least 500 px wide, so the page is
shown in an iframe of exactly the width asked for (inside a wider window where needed) and the
screenshot is cropped to it. Exit status 1 when the page is wider than the window (the page
would scroll sideways on that screen) or an image did not decode.

Needs a Chromium on PATH (``chromium``, ``chromium-browser`` or ``google-chrome``; Debian:
``apt-get install -y --no-install-recommends chromium``). Nothing is fetched from the network:
the report is self-contained and Chromium runs with its background networking switched off.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["find_chromium", "measure", "screenshot", "main"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_MARK = "ckapipe-layout"
_MIN_WINDOW = 500  # Chromium does not make a window narrower
# runs in the report (inside the iframe) after layout and posts the numbers to the host page,
# which writes them into its DOM for --dump-dom (postMessage works between file:// origins)
_MEASURE_SCRIPT = (
    "<script>addEventListener('load', function () {"
    "var d = document.documentElement, images = Array.from(document.images);"
    "parent.postMessage(JSON.stringify({scroll_width: d.scrollWidth, inner_width: innerWidth,"
    " scroll_height: d.scrollHeight, images: images.length,"
    " broken_images: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })"
    ".length}), '*'); });</script>"
)
_HOST = (
    "<!DOCTYPE html><html><body style='margin:0'>"
    "<script>addEventListener('message', function (e) {"
    "var out = document.createElement('pre'); out.id = '" + _MARK + "';"
    "out.textContent = e.data; document.body.appendChild(out); });</script>"
    "<iframe src='{src}' scrolling='no' "
    "style='border:0;display:block;width:{width}px;height:{height}px'></iframe></body></html>"
)


def _host_page(folder: Path, report: Path, width: int, height: int) -> Path:
    host = folder / f"host_{width}x{height}.html"
    page = _HOST.replace("{src}", report.as_uri()).replace("{width}", str(width))
    host.write_text(page.replace("{height}", str(height)))
    return host


def find_chromium() -> str | None:
    """Path of a Chromium-family browser on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(browser: str, profile: Path, width: int, height: int, *extra: str) -> list[str]:
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        *extra,
    ]


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{command[0]} exited with status {completed.returncode}: {completed.stderr[-2000:]}"
        )
    return completed


def measure(report: Path, width: int, *, browser: str, timeout: float = 120) -> dict:
    """Layout of ``report`` in a viewport ``width`` CSS pixels wide: ``scroll_width``,
    ``inner_width``, ``scroll_height``, ``images`` and ``broken_images``."""
    page = Path(report).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        copy = folder / "report.html"
        copy.write_text(page.replace("</body>", _MEASURE_SCRIPT + "</body>"))
        host = _host_page(folder, copy, width, 900)
        command = _chromium(
            browser,
            folder / "profile",
            max(width, _MIN_WINDOW),
            900,
            "--virtual-time-budget=10000",  # let the iframe load and post its message
            "--dump-dom",
        )
        dom = _run([*command, host.as_uri()], timeout).stdout
    found = re.search(rf'<pre id="{_MARK}">(.*?)</pre>', dom, re.S)
    if not found:
        raise RuntimeError(f"the measuring script did not run in {browser}; DOM: {dom[-500:]}")
    return json.loads(found.group(1).replace("&quot;", '"'))


def screenshot(
    report: Path, out: Path, width: int, height: int, *, browser: str, timeout: float = 120
) -> Path:
    """A PNG of the top ``height`` CSS pixels of ``report`` in a viewport ``width`` wide."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        host = _host_page(folder, Path(report).resolve(), width, height)
        window = max(width, _MIN_WINDOW)
        command = _chromium(browser, folder / "profile", window, height, f"--screenshot={out}")
        _run([*command, "--virtual-time-budget=10000", host.as_uri()], timeout)
    if not out.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot to {out}")
    if window > width:
        from PIL import Image

        with Image.open(out) as image:
            image.crop((0, 0, width, image.height)).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the report HTML file")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument(
        "--widths", default="390,1280", help="window widths in CSS pixels (default 390,1280)"
    )
    parser.add_argument(
        "--max-height", type=int, default=8000, help="crop screenshots to this height (px)"
    )
    parser.add_argument(
        "--colors",
        type=int,
        default=0,
        help="save the PNGs with a palette of this many colours (e.g. 256: a third of the "
        "bytes, for committing screenshots); 0 keeps full colour",
    )
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        print(f"no Chromium on PATH (looked for {', '.join(BROWSERS)})", file=sys.stderr)
        return 2
    ok = True
    for width in (int(w) for w in args.widths.split(",")):
        layout = measure(args.report, width, browser=browser)
        height = min(int(layout["scroll_height"]), args.max_height)
        png = screenshot(
            args.report, args.out_dir / f"report_{width}px.png", width, height, browser=browser
        )
        if args.colors:
            from PIL import Image

            with Image.open(png) as image:
                image.convert("RGB").quantize(
                    colors=args.colors, method=Image.Quantize.FASTOCTREE
                ).save(png, optimize=True)
        layout.update(width=width, png=str(png), png_height=height, png_bytes=png.stat().st_size)
        layout["overflows"] = layout["scroll_width"] > layout["inner_width"]
        ok = ok and not layout["overflows"] and layout["broken_images"] == 0
        print(json.dumps(layout))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
