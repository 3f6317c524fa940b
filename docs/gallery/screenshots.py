"""The README's screenshots, taken with headless Chromium (Debian's `chromium`):

    .venv/bin/python docs/gallery/screenshots.py status runs/quickstart docs/gallery/status.png
    .venv/bin/python docs/gallery/screenshots.py compare runs/quickstart docs/gallery/mlflow_compare.png
    .venv/bin/python docs/gallery/screenshots.py report runs/quickstart docs/gallery/report.png

`status` draws `grokstudy status DIR` as a terminal would (take it while the study runs);
`compare` serves the study's MLflow store on a free loopback port and shoots the UI's compare
view of its trial runs; `report` opens the study's report.html, hovers and clicks the grokking
cell with the latest generalization (through the DevTools protocol, as tests/test_report.py does).
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


def report(study_dir: str, out: Path) -> None:
    import base64

    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from cdp import browser  # the tests' DevTools client: standard library only

    from grokstudy.points import point_label

    d = Path(study_dir).resolve()
    rows = [r for r in pq.read_table(d / "trials.parquet").to_pylist() if r["phase"] == "grokking"]
    late = max(rows, key=lambda r: r["t_val"])
    label = point_label({k: late[k] for k in ("data.fraction", "optimizer.weight_decay")}) + ":"
    with tempfile.TemporaryDirectory() as profile, browser(Path(profile), "--window-size=1280,900") as chrome:
        page = chrome.page()
        page.open((d / "report.html").as_uri())
        box = page.evaluate(
            "(() => { const g = [...document.querySelectorAll('g.cell')].find(c => c.getAttribute('aria-label')"
            f".startsWith({json.dumps(label)})); const r = g.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        page.click(box["x"], box["y"])
        page.mouse("mouseMoved", box["x"], box["y"])
        time.sleep(0.5)  # the tooltip's fade-in: a picture, not a test
        out.write_bytes(base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"]))


if __name__ == "__main__":
    what, study_dir, out = sys.argv[1:4]
    {"status": status, "compare": compare, "report": report}[what](study_dir, Path(out).resolve())
