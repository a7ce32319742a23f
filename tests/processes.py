"""The CLI as users run it, in new processes, for the tests that kill, hold or crash a writer
(test_faults_write.py, test_lock.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rapidin_index.store.lock import PAUSE_ENV


def cli(*arguments: str, env: dict | None = None, wait: bool = True, prelude: str = ""):
    """`rapidin-index ARGUMENTS` in a new interpreter (``python -m rapidin_index.cli.main``, so a lock
    holder's command line names it); ``prelude`` runs first, to inject a fault."""
    if prelude:
        command = [
            sys.executable,
            "-c",
            f"{prelude}\nfrom rapidin_index.cli.main import app\napp()",
            *arguments,
        ]
    else:
        command = [sys.executable, "-m", "rapidin_index.cli.main", *arguments]
    environment = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def build_arguments(model_dir: str, data, index_dir, k: int, chunk: int, *extra: str) -> list[str]:
    """A float32 build's arguments, as conftest's build_settings (which resumes these builds) has them."""
    return [
        "build", "--model", model_dir, "--data", str(data), "--index", str(index_dir), "--k", str(k),
        "--batch-size", "4", "--chunk-size", str(chunk), "--device", "cpu", "--quiet",
        "--vector-dtype", "float32", *extra,
    ]  # fmt: skip


def start_paused(arguments: list[str], point: str, hold: Path) -> subprocess.Popen:
    """A writer process held at pause ``point`` (store/lock.py's test hook) until ``hold`` is removed."""
    hold.write_text("")
    process = cli(*arguments, env={PAUSE_ENV: f"{point}:{hold}"}, wait=False)
    deadline = time.monotonic() + 300
    while not Path(f"{hold}.paused").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the writer never reached {point}: {process.communicate()}")
        time.sleep(0.05)
    return process


def release(process: subprocess.Popen, hold: Path) -> tuple[int, str]:
    """Let a held writer go on; its exit code and stderr."""
    hold.unlink()
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr
