"""Headless Chromium for the web page's tests and its screenshot in the docs.

Debian's Chromium (`apt-get install -y chromium`: /usr/bin/chromium), driven by Playwright's
Python package; never `playwright install` (nothing is downloaded). `.ci/run` installs the
browser when it is missing. The flags keep it from reaching any network: no background
networking, updates, sync or QUIC.
"""

import contextlib
import os
import socket

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def page(width: int = 1200, height: int = 900):
  """A Playwright page of a fresh headless Chromium whose requests to anywhere but this
  machine are refused and listed in `page.outside` (a test asserts it stays empty)."""
  if not os.path.exists(CHROMIUM):
    raise FileNotFoundError(f"{CHROMIUM} not found: the browser test needs Debian's Chromium "
                            "(apt-get install -y chromium; .ci/run installs it)")
  from playwright.sync_api import sync_playwright
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    try:
      tab = browser.new_page(viewport={"width": width, "height": height})
      tab.outside = []

      def route(r):
        host = r.request.url.split("/")[2] if "://" in r.request.url else ""
        if host.split(":")[0] in ("127.0.0.1", "localhost") or r.request.url.startswith("data:"):
          r.continue_()
        else:
          tab.outside.append(r.request.url)
          r.abort()
      tab.route("**/*", route)
      yield tab
    finally:
      browser.close()
