"""Every option and its default, in one place; configs/*.py start from `base()`.

Paths left empty are derived from `workdir` by `run.resolve()`:
teacher.path '' -> <workdir>/teacher, pairs.out_dir '' -> <workdir>/pairs.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "/tmp/d2g"
  c.seed = 0
  c.stages = "pairs"
  c.distributed = False            # multi-host: jax.distributed.initialize() (see launch/)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.path = ""              # a diffusers pipeline folder (model_index.json, unet/, vae/, ...)
  c.teacher.dtype = "float32"      # compute dtype: float32, or bfloat16 on accelerators
  c.teacher.attention = "auto"     # auto (cudnn on GPU bf16, chunked on CPU) | xla | cudnn | chunked
  c.teacher.tiny_family = "sd1"    # tiny_teacher stage only: sd1 | sd2 | sdxl

  c.pairs = ml_collections.ConfigDict()
  c.pairs.prompts = ""             # prompts.txt | prompts.jsonl | tfds:<name>[/<config>]/<split>
  c.pairs.prompt_field = ""        # JSONL field ('' = "prompt", else "caption")
  c.pairs.tfds_data_dir = ""       # where the tfds dataset was prepared
  c.pairs.caption_key = ""         # tfds feature path, e.g. captions/text ('' = auto)
  c.pairs.all_captions = False     # tfds: every caption of an example, not only the first
  c.pairs.num_pairs = -1           # -1: one pair per prompt
  c.pairs.out_dir = ""
  c.pairs.guidance_scale = 3.0     # the paper's SD-CFG-3 (8.0 for SD-CFG-8)
  c.pairs.num_steps = 50           # DDIM steps, eta = 0: the teacher's ODE
  c.pairs.eta = 0.0
  c.pairs.height = 0               # pixels; 0 = the teacher's default (512 SD 1.5, 1024 SDXL)
  c.pairs.width = 0
  c.pairs.batch_size = 8           # global; a multiple of the number of devices
  c.pairs.shard_size = 1024        # pairs per ArrayRecord shard
  c.pairs.store_embeddings = True  # store text embeddings beside the token ids
  c.pairs.negative_prompt = ""     # the unconditional prompt of CFG
  return c
