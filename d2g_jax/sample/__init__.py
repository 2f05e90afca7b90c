"""Sampling a trained student (and its teacher) from Python, the command line or a web page.

    from d2g_jax.sample import load_student
    out = load_student("/runs/sd15/export")(["a photo of a cat"], seeds=[0])  # .images, .latents

    python -m d2g_jax.sample --model /runs/sd15/export --prompt "a photo of a cat" --num 4 \\
        --seed 0 --out /tmp/cats [--teacher /models/sd15 --teacher_steps 50 --guidance 3]

  api.py       load_student / load_teacher_sampler -> ImageSampler: prompts and seeds (or
               noise) -> uint8 images and latents; jitted once per batch size, sharded
  __main__.py  the command line: PNGs, one JSON line per image, with a teacher its images
               from the same noise, a side-by-side grid and both samplers' images per second

The web page (`python -m d2g_jax.app`) and `benchmarks/one_step.py --model` sample through the
same API. docs/sampling.md is the manual.
"""

from d2g_jax.sample.api import (  # noqa: F401
    DEFAULT_BATCH,
    DEFAULT_GUIDANCE,
    DEFAULT_TEACHER_STEPS,
    ImageSampler,
    Samples,
    load_student,
    load_teacher_sampler,
    seed_noise,
)
