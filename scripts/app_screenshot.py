"""A screenshot of the web page (`python -m d2g_jax.app`) after one Generate, for the docs.

  python scripts/app_screenshot.py --model /tmp/d2g_demo/export --teacher /tmp/d2g_demo/teacher \
      --teacher_steps 50 --guidance 4 --prompt "a handwritten digit 7" --count 8 \
      --out docs/images/app.png

Serves the page on a free local port, opens it in headless Debian Chromium (the browser test's
setup, tests/browser.py: `apt-get install -y chromium`, the `test` extra's playwright), types
the prompt, presses Generate, waits for every image and saves the whole page as a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import browser  # noqa: E402  (tests/browser.py)

from d2g_jax import app  # noqa: E402
from d2g_jax.sample import api  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--teacher", default="")
  p.add_argument("--teacher_steps", type=int, default=api.DEFAULT_TEACHER_STEPS)
  p.add_argument("--guidance", type=float, default=api.DEFAULT_GUIDANCE)
  p.add_argument("--prompt", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--count", type=int, default=8)
  p.add_argument("--width", type=int, default=1280, help="browser window, pixels")
  p.add_argument("--out", required=True, help="the PNG to write")
  args = p.parse_args()

  student = api.load_student(args.model)
  teacher = (api.load_teacher_sampler(args.teacher, num_steps=args.teacher_steps,
                                      guidance_scale=args.guidance) if args.teacher else None)
  for sampler in [student] + ([teacher] if teacher else []):
    sampler.compile(args.count)  # as python -m d2g_jax.app does before serving
  page = app.build(student, teacher, prompt=args.prompt, count=args.count)
  port = browser.free_port()
  app.launch(page, port=port, block=False)
  try:
    with browser.page(width=args.width, height=800) as tab:
      tab.goto(f"http://127.0.0.1:{port}")
      seed = tab.locator("#seed input")
      seed.fill(str(args.seed))
      tab.locator("#generate").click()
      for sampler in ["student"] + (["teacher"] if teacher else []):
        tab.locator(f"#{sampler}_images img").nth(args.count - 1).wait_for(timeout=600_000)
        tab.locator(f"#{sampler}_time").get_by_text("image(s) in").wait_for()
      tab.wait_for_timeout(500)  # the images' fade-in
      tab.screenshot(path=args.out, full_page=True)
      if tab.outside:
        raise SystemExit(f"the page asked for {tab.outside}: it must need no network")
  finally:
    page.close()
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
