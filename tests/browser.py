"""Headless Chromium for the report tests: find it, screenshot a page, dump a page's DOM after its JS ran."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
TIMEOUT_SECONDS = 60

# Without the background-networking flags Chromium keeps dialling out, and this network refuses it.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

# For Playwright, which starts Chromium headless itself.
PLAYWRIGHT_FLAGS = [flag for flag in FLAGS if flag != "--headless"]


def find_chromium() -> str | None:
    """The path of a Chromium / Chrome binary, or None when none is installed."""
    for candidate in CANDIDATES:
        found = candidate if Path(candidate).is_file() else shutil.which(candidate)
        if found:
            return found
    return None


def _run(binary: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    command = [binary, *FLAGS, f"--user-data-dir={profile}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)


def screenshot(binary: str, url: str, png: Path, profile: Path, window: str = "1200,2000") -> Path:
    """Render ``url`` to ``png``; raises with Chromium's stderr when no image came out."""
    completed = _run(binary, profile, f"--screenshot={png}", f"--window-size={window}", url)
    if not png.exists():
        raise RuntimeError(
            f"chromium wrote no screenshot (rc {completed.returncode}): {completed.stderr[-2000:]}"
        )
    return png


def dump_dom(binary: str, url: str, profile: Path) -> str:
    """The serialised DOM of ``url`` once it has loaded (inline scripts have run by then)."""
    completed = _run(binary, profile, "--dump-dom", url)
    if completed.returncode != 0 or "<body" not in completed.stdout:
        raise RuntimeError(
            f"chromium --dump-dom failed (rc {completed.returncode}): {completed.stderr[-2000:]}"
        )
    return completed.stdout


def png_size_and_pixel_bytes(png: Path) -> tuple[tuple[int, int], bytes]:
    """(width, height) and the decompressed scanlines (filter bytes included) of a PNG."""
    data = png.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{png} is not a PNG")
    offset, size, compressed = 8, (0, 0), b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            compressed += body
        offset += 12 + length
    return size, zlib.decompress(compressed)
