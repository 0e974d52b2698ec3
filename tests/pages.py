"""Checks of self-contained HTML pages: what they reference (parsed), and how they load in headless Chromium.

Chromium is driven over the DevTools protocol on a pipe, with the standard library only:
`--remote-debugging-pipe` makes it read protocol messages on fd 3 and write on fd 4, each a JSON object ended
by a NUL byte: no port, no websocket client, nothing reachable from outside the test.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--hide-scrollbars")  # fmt: skip
IMAGES_LOADED = "[...document.images].every(i => i.complete && i.naturalWidth > 0)"


EMBEDDED_IMAGE = "data:image/png;base64,"
URL_ATTRIBUTES = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background", "xlink:href",
                  "ping", "manifest", "codebase", "cite", "longdesc", "usemap", "archive", "profile"}  # fmt: skip
ACTIVE_TAGS = {"script", "link", "iframe", "frame", "object", "embed", "base", "form", "applet", "audio", "video",
               "source", "track", "svg", "math", "meta"}  # fmt: skip


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.ids: set[str] = set()
        self.anchors: list[str] = []
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.in_style = tag == "style"
        values = dict(attrs)
        policy = (values.get("http-equiv") or "content-security-policy").lower() == "content-security-policy"
        if tag == "meta" and set(values) <= {"charset", "name", "content", "http-equiv"} and policy:
            pass  # charset, viewport and the Content-Security-Policy (not a refresh)
        elif tag in ACTIVE_TAGS:
            self.found.append(f"<{tag}>")
        for name, value in attrs:
            value = (value or "").strip()
            if name == "id":
                self.ids.add(value)
            elif name.startswith("on"):
                self.found.append(f"<{tag} {name}=...> (an event handler)")
            elif name == "style" and ("url(" in value or "expression(" in value):
                self.found.append(f"<{tag} style={value!r}>")
            elif name == "href" and tag == "a" and value.startswith("#"):
                self.anchors.append(value[1:])
            elif name == "src" and tag == "img" and value.startswith(EMBEDDED_IMAGE):
                continue
            elif name in URL_ATTRIBUTES:
                self.found.append(f"<{tag} {name}={value[:80]!r}>")

    def handle_endtag(self, tag: str) -> None:
        self.in_style = False

    def handle_data(self, data: str) -> None:
        if self.in_style and ("url(" in data or "@import" in data):
            self.found.append("a url() or @import in <style>")


def outside_references(page: str) -> list[str]:
    """Everything in an HTML page that could load, run or navigate to something the page does not embed: tags
    such as script, link or iframe, event handlers, url attributes other than PNG data URIs on <img> and links to
    #ids of the page itself, url() in styles; links to an #id the page lacks count too."""
    parser = _References()
    parser.feed(page)
    parser.close()
    missing = [f"<a href='#{a}'> (no such id)" for a in parser.anchors if a not in parser.ids]
    return parser.found + missing


def find_chromium() -> str | None:
    """/usr/bin/chromium, else `chromium` on PATH, else None."""
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")


@dataclass
class Visit:
    """What loading one page did: its images, errors, requests and a full-page screenshot."""

    images: int = 0
    images_loaded: bool = False
    errors: list[str] = field(default_factory=list)  # exceptions, console errors, log errors, failed loads
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, itself included
    screenshot: bytes = field(default=b"", repr=False)


def visit(page: Path, width: int = 1280, timeout: float = 20.0) -> Visit:
    """Open `page` in a fresh headless Chromium, wait for its load event, and report what happened."""
    with tempfile.TemporaryDirectory() as profile, _Browser(profile, timeout) as browser:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)  # fmt: skip
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        result = Visit()
        result.images = browser.evaluate("document.images.length", session)
        result.images_loaded = browser.evaluate(IMAGES_LOADED, session)
        size = browser.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}
        shot = browser.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                            session)  # fmt: skip
        result.screenshot = base64.b64decode(shot["data"])
        result.errors, result.requests = browser.errors(), browser.requests()
        return result


class _Browser:
    """One Chromium process and its protocol pipe; events are kept as they arrive."""

    def __init__(self, profile: str, timeout: float):
        self.deadline = time.monotonic() + timeout
        self.events: list[dict[str, Any]] = []
        self.buffer = b""
        self.next_id = 0
        to_chrome, self.writer = os.pipe()
        self.reader, from_chrome = os.pipe()
        # Chromium's ends above fd 4, then put on fds 3 and 4 by a tiny exec trampoline (dash's redirections
        # stop at fd 9)
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome, from_chrome)]
        os.close(to_chrome)
        os.close(from_chrome)
        trampoline = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); " \
                     "os.closerange(5, 4096); os.execv(sys.argv[3], sys.argv[3:])"  # fmt: skip
        command = [sys.executable, "-c", trampoline, *map(str, ends), find_chromium(), *FLAGS,
                   f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(command, pass_fds=ends, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=self.log, start_new_session=True)  # fmt: skip
        for fd in ends:
            os.close(fd)

    def __enter__(self) -> _Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(timeout=5)
        except (OSError, TimeoutError, subprocess.TimeoutExpired):
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):  # what is left of its session: renderers, helpers
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            os.close(self.writer)
            os.close(self.reader)
            self.log.close()

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its answer (events meanwhile are kept)."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self.writer, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise OSError(f"Chromium is gone: {self._log_tail()}") from None
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str, session: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"]["value"]

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self._receive()

    def errors(self) -> list[str]:
        """Exceptions, console.error calls, error log entries (blocked loads, CSP violations), failed loads."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.loadingFailed":
                found.append(f"load failed: {params.get('errorText')}")
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def _receive(self) -> dict[str, Any]:
        """The next message; events are also kept in `events`."""
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.reader], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer in time: {self._log_tail()}")
            chunk = os.read(self.reader, 1 << 20)
            if not chunk:
                raise OSError(f"Chromium closed its protocol pipe: {self._log_tail()}")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        message = json.loads(raw)
        if "method" in message:
            self.events.append(message)
        return message

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:].decode(errors="replace")
