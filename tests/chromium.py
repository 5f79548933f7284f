"""Headless Debian Chromium for page tests: the flags this closed network needs, the DOM, the console."""

import re
import shutil
import subprocess

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=8000", "--enable-unsafe-swiftshader"]
# Chromium's own GL driver notes about its software WebGL (the parallel-coordinates chart
# draws with WebGL) reach the console too; they say nothing about the page.
BROWSER_NOTE = re.compile(r'CONSOLE[^"]*"\[\.WebGL-[0-9a-fx]+\]GL Driver Message \(OpenGL, Performance')


def console_messages(stderr: str) -> list[str]:
    """Messages the page wrote to the console (console.* calls, uncaught errors)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln and not BROWSER_NOTE.search(ln)]


def dump(url: str, profile) -> subprocess.CompletedProcess:
    """The DOM of `url` after its scripts ran (stdout), and the console (stderr)."""
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
