"""A web page to try a student: a prompt, a seed and a number of images in; its images out,
and, given a teacher, the teacher's N-step images from the same noise, each with its time.

    python -m d2g_jax.app --model /tmp/d2g_demo/export --teacher /tmp/d2g_demo/teacher \\
        --guidance 4 --prompt "a handwritten digit 7"          # the digits demo's, as it logs
    python -m d2g_jax.app --model /runs/sd15/export --teacher /models/sd15 --port 7860

then open http://127.0.0.1:7860. --model is what `d2g_jax.sample.load_student` reads (an
exported folder or a training workdir); --teacher a diffusers pipeline folder. Image i of a
request has seed `seed + i` (`d2g_jax.sample.api.seed_noise`), so `python -m d2g_jax.sample`
with the same seed draws the same image. Small images (the digits' 32 pixels) are shown
enlarged, pixel for pixel, to at least --display pixels a side.

Gradio is the `app` extra (pip install -e '.[app]'). Nothing is fetched from the network:
analytics and its version check are off (GRADIO_ANALYTICS_ENABLED=False), the page uses the
browser's own fonts instead of Google Fonts, no share link, no server-side rendering.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from d2g_jax import log
from d2g_jax.sample import api

_log = log.get_logger("d2g_jax.app")  # not "__main__" when run with python -m

# Set before gradio is imported: no analytics, no version check, no hub telemetry.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_HUB_OFFLINE": "1", "GRADIO_SSR_MODE": "False"}
MAX_IMAGES = 8
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")


def _gradio():
  for key, value in OFFLINE_ENV.items():
    os.environ.setdefault(key, value)
  try:
    import gradio
  except ImportError:
    raise ImportError("the web page needs Gradio: pip install -e '.[app]'") from None
  return gradio


def enlarge(images_BxHxWx3: np.ndarray, display: int) -> list[np.ndarray]:
  """Each image repeated pixel for pixel to at least `display` pixels on its shorter side."""
  zoom = max(1, -(-display // min(images_BxHxWx3.shape[1:3])))
  return [np.repeat(np.repeat(x, zoom, axis=0), zoom, axis=1) for x in images_BxHxWx3]


def describe(sampler: api.ImageSampler, samples: api.Samples) -> str:
  """One line: what sampled, how many images, in how long."""
  m = sampler.meta
  what = (f"teacher, {m['num_steps']} DDIM steps with CFG {m['guidance_scale']:g}"
          if sampler.name == "teacher" else "student, 1 step")
  line = (f"**{what}**: {len(samples.images)} image(s) in {samples.seconds:.3f} s "
          f"({samples.images_per_second:.3g} images/s)")
  if samples.compile_seconds:
    line += f"; compiled first in {samples.compile_seconds:.1f} s"
  return line


def generate(samplers: list[api.ImageSampler], prompt: str, seed: float, count: float,
             display: int) -> list:
  """The page's one action: per sampler, its images (enlarged, captioned with their seeds) and
  its line of timing."""
  seeds = [int(seed) + i for i in range(int(count))]
  outputs = []
  for sampler in samplers:
    samples = sampler([prompt], seeds=seeds)
    captioned = [(x, f"seed {s}") for x, s in zip(enlarge(samples.images, display), seeds)]
    outputs += [captioned, describe(sampler, samples)]
  return outputs


def build(student: api.ImageSampler, teacher: api.ImageSampler | None = None, *,
          prompt: str = "", count: int = 4, display: int = 128):
  """The page (a gradio.Blocks, not yet launched): prompt, seed, number of images, Generate;
  a gallery and a timing line per sampler."""
  gr = _gradio()
  samplers = [student] + ([teacher] if teacher else [])
  with gr.Blocks(title="d2g_jax: one-step student", analytics_enabled=False) as page:
    gr.Markdown(f"# One-step student\n`{student.meta.get('path') or student.meta.get('checkpoints')}`"
                + (f" beside its teacher `{teacher.meta['path']}`, from the same noise" if teacher
                   else ""))
    with gr.Row():
      text = gr.Textbox(value=prompt, label="Prompt", elem_id="prompt", scale=4)
      seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=api.MAX_SEED - 1,
                       elem_id="seed", scale=1)
      count = gr.Slider(1, MAX_IMAGES, value=count, step=1, label="Number of images",
                        elem_id="count", scale=2)
    button = gr.Button("Generate", variant="primary", elem_id="generate")
    outputs = []
    for sampler in samplers:
      label = "student, 1 step" if sampler.name == "student" else (
          f"teacher, {sampler.meta['num_steps']} steps, CFG {sampler.meta['guidance_scale']:g}")
      with gr.Column():
        outputs.append(gr.Gallery(label=label, format="png", columns=MAX_IMAGES,
                                  height=display + 64, object_fit="contain",
                                  elem_id=f"{sampler.name}_images"))
        outputs.append(gr.Markdown(elem_id=f"{sampler.name}_time"))
    run = lambda p, s, c: generate(samplers, p, s, c, display)
    button.click(run, [text, seed, count], outputs)
    text.submit(run, [text, seed, count], outputs)
  return page


def launch(page, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
  """Serves the page on host:port (local only by default; no share link)."""
  gr = _gradio()
  theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))
  return page.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                     prevent_thread_lock=not block, quiet=True, ssr_mode=False, pwa=False,
                     mcp_server=False, enable_monitoring=False, theme=theme,
                     footer_links=[])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m d2g_jax.app", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="an exported diffusers folder or a training workdir")
  p.add_argument("--teacher", default="", help="a diffusers pipeline folder to compare with")
  p.add_argument("--teacher_steps", type=int, default=api.DEFAULT_TEACHER_STEPS)
  p.add_argument("--guidance", type=float, default=api.DEFAULT_GUIDANCE)
  p.add_argument("--prompt", default="", help="the prompt the page starts with")
  p.add_argument("--count", type=int, default=4, help="images the page starts with (1-8)")
  p.add_argument("--display", type=int, default=128, help="smallest side shown, pixels")
  p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
  p.add_argument("--port", type=int, default=7860)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  log.setup()
  try:
    student = api.load_student(args.model)
    teacher = (api.load_teacher_sampler(args.teacher, num_steps=args.teacher_steps,
                                        guidance_scale=args.guidance) if args.teacher else None)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  for sampler in [student] + ([teacher] if teacher else []):
    _log.info("%s: compiled for %d images in %.1f s", sampler.name, args.count,
              sampler.compile(args.count))
  page = build(student, teacher, prompt=args.prompt, count=args.count, display=args.display)
  _log.info("open http://%s:%d (Ctrl-C stops)", args.host, args.port)
  launch(page, args.host, args.port)
  return 0


if __name__ == "__main__":
  sys.exit(main())
