"""The digits demo's teacher: a miniature Stable Diffusion trained here on scikit-learn's 8x8 digits.

  digits.py         the data: upsampled RGB digits, a fixed split, prompts
  classifier.py     the judge: a digit classifier fit on the real digits (scikit-learn)
  text.py           a tiny CLIP tokenizer for the prompts and a random, frozen CLIP text encoder
  fit.py            a small resumable training loop (one jitted step)
  vae_train.py      stage digits_vae: a tiny AutoencoderKL -> a diffusers VAE folder
  teacher_train.py  stage digits_teacher: a tiny text-conditioned UNet -> a StableDiffusionPipeline
  pipeline.py       the pipeline folder (model_index, DDIM scheduler, the exporters' components)
  folders.py        folders written whole, marked with the settings that made them
  check.py          how often the teacher draws the prompted digit
"""
