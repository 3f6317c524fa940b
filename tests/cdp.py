"""Headless Chromium driven over the Chrome DevTools Protocol, with nothing but the standard library.

`--remote-debugging-pipe` makes Chromium read commands from file descriptor 3 and write
answers and events to descriptor 4, each a JSON message ended by a NUL byte: no debugging port,
no WebSocket client. A `Browser` owns one Chromium (its own process group, stopped by
`servers.stop_group`); `Browser.page()` opens a tab as a flattened session (`Page`), whose
`wait_for` polls a JavaScript condition until it holds: tests wait on what the page shows,
never on time.

Checked against Chromium 150.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from servers import CHROMIUM, HEADLESS, stop_group

# sh puts our two pipe ends (its stdin and stdout) on the descriptors Chromium talks on, then
# gives Chromium /dev/null and the log as stdin and stdout: no descriptor numbers to juggle here.
ON_PIPES = 'exec "$@" 3<&0 4>&1 0</dev/null 1>&2'
FLAGS = (*HEADLESS, "--remote-debugging-pipe")


class CdpError(RuntimeError):
    """A command Chromium answered with an error, or a page script that threw."""


class Browser:
    """One headless Chromium and its DevTools pipe; answers matched to commands by id, every
    event kept (with its session) for `events`."""

    def __init__(self, profile: Path, log: Path, *flags: str) -> None:
        command_in, self._commands = os.pipe()
        self._messages, message_out = os.pipe()
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", ON_PIPES, "sh", CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *flags],
                stdin=command_in,
                stdout=message_out,
                stderr=out,
                start_new_session=True,
            )
        os.close(command_in)
        os.close(message_out)
        self._writer = os.fdopen(self._commands, "wb")
        self._lock = threading.Condition()
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._last_id = 0
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        pending = b""
        with os.fdopen(self._messages, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                *messages, pending = (pending + chunk).split(b"\0")
                with self._lock:
                    for raw in messages:
                        message = json.loads(raw)
                        if "id" in message:
                            self._answers[message["id"]] = message
                        else:
                            self._events.append(message)
                    self._lock.notify_all()
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout_s: float = 30.0) -> dict[str, Any]:  # fmt: skip
        """Send one command and wait for its answer's result; CdpError if it failed."""
        with self._lock:
            self._last_id += 1
            command_id = self._last_id
        message = {"id": command_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._writer.write(json.dumps(message).encode() + b"\0")
        self._writer.flush()
        with self._lock:
            if not self._lock.wait_for(lambda: command_id in self._answers or self._closed, timeout_s):
                raise TimeoutError(f"no answer to {method} within {timeout_s}s")
            answer = self._answers.pop(command_id, None)
        if answer is None:
            raise CdpError(f"Chromium closed its pipe before answering {method}:\n{self.log_tail()}")
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return answer["result"]

    def events(self, method: str, session: str | None = None) -> list[dict[str, Any]]:
        """The params of every `method` event so far (of one session, if given)."""
        with self._lock:
            return [
                e["params"]
                for e in self._events
                if e["method"] == method and (session is None or e.get("sessionId") == session)
            ]

    def page(self, width: int = 1280, height: int = 1000) -> Page:
        """A new tab of `width` x `height` CSS pixels, attached as a flattened session."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return page

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout_s=5)
        except (CdpError, TimeoutError, OSError):
            pass  # stop_group below ends it either way
        stop_group(self.proc, grace_s=5)
        self._writer.close()
        self._reader.join(timeout=5)


class Page:
    """One tab: commands sent to its session, JavaScript evaluated in it."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def events(self, method: str) -> list[dict[str, Any]]:
        return self.browser.events(method, self.session)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression; CdpError with its message if it throws."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CdpError(
                f"{expression!r} threw: {details.get('exception', {}).get('description', details)}"
            )
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Poll `expression` until it is truthy; its value. TimeoutError (naming it) past the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still {value!r} after {timeout_s}s")
            time.sleep(0.05)

    def open(self, url: str, timeout_s: float = 30.0) -> None:
        """Navigate to `url` and wait until its document has loaded."""
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", timeout_s)

    def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        """One `Input.dispatchMouseEvent` (mouseMoved, mousePressed, mouseReleased) at viewport (x, y)."""
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def click(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, button="left", clickCount=1)
        self.mouse("mouseReleased", x, y, button="left", clickCount=1)


@contextmanager
def browser(directory: Path, *flags: str) -> Iterator[Browser]:
    """A headless Chromium with its profile and log in `directory`; stopped afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    chrome = Browser(directory / "profile", directory / "chromium.log", *flags)
    try:
        yield chrome
    finally:
        chrome.close()
