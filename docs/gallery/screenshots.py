"""The README's two screenshots, taken with headless Chromium (Debian's `chromium`):

    .venv/bin/python docs/gallery/screenshots.py status runs/quickstart docs/gallery/status.png
    .venv/bin/python docs/gallery/screenshots.py compare runs/quickstart docs/gallery/mlflow_compare.png

`status` draws `grokstudy status DIR` as a terminal would (take it while the study runs);
`compare` serves the study's MLflow store on a free loopback port and shoots the UI's compare
view of its trial runs.
"""

from __future__ import annotations

import html
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

CHROMIUM = "/usr/bin/chromium"


def shoot(url: str, out: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--virtual-time-budget=20000", f"--window-size={size}",
             f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


def status(study_dir: str, out: Path) -> None:
    text = subprocess.run(
        [sys.executable, "-m", "grokstudy", "status", study_dir], check=True, capture_output=True, text=True
    ).stdout
    lines = text.count("\n") + 1
    width = max(len(line) for line in text.splitlines()) * 9.2 + 40
    page = (
        "<html><body style='margin:0;background:#1e1e1e'><pre style='margin:0;padding:14px;color:#e6e6e6;"
        f"font:15px/1.35 DejaVu Sans Mono,monospace'>$ grokstudy status {html.escape(study_dir)}\n"
        f"{html.escape(text)}</pre></body></html>"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".html", delete=False) as f:
        f.write(page)
    shoot(f"file://{f.name}", out, f"{int(width)},{int(lines * 20.3 + 60)}")


def compare(study_dir: str, out: Path) -> None:
    from mlflow import MlflowClient

    d = Path(study_dir).resolve()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "grokstudy", "ui", str(d), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        client = MlflowClient(uri)
        name = json.loads((d / "progress.json").read_text())["study"]
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id], "tags.`grokstudy.kind` = 'trial'")
        ids = json.dumps([r.info.run_id for r in runs])
        url = f"{uri}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([experiment.experiment_id]))}"
        shoot(url, out, "1400,1000")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    what, study_dir, out = sys.argv[1:4]
    {"status": status, "compare": compare}[what](study_dir, Path(out).resolve())
