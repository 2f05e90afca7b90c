"""Every option and its default, in one place; configs/*.py start from `base()`.

Paths left empty are derived from `workdir` by `run.resolve()`:
teacher.path '' -> <workdir>/teacher, pairs.out_dir '' -> <workdir>/pairs,
eval.out_dir '' -> <workdir>/eval.
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

  # eval: the paper's tables (README "Evaluation"); one block per row, in eval.rows order.
  c.eval = ml_collections.ConfigDict()
  c.eval.out_dir = ""              # '' = <workdir>/eval
  c.eval.rows = "teacher,student"  # table rows, each a block below (configs may add blocks)
  c.eval.teacher = eval_row("ddim", num_steps=50, guidance_scale=3.0)  # path '' = teacher.path
  c.eval.student = eval_row("one_step")  # path: a folder from convert.pipeline.export_pipeline
  c.eval.prompts = ""              # captions: .txt | .jsonl | tfds:coco_captions/2014/val
  c.eval.prompt_field = ""         # JSONL field
  c.eval.tfds_data_dir = ""
  c.eval.caption_key = ""
  c.eval.num_samples = -1          # N, the first N captions (-1: all); FID-30k: 30000
  c.eval.height = 0                # pixels; 0 = the pipeline's default
  c.eval.width = 0
  c.eval.batch_size = 8            # global; a multiple of the number of devices
  c.eval.shard_size = 1024         # samples per ArrayRecord shard (the unit of resumption)
  c.eval.grid_size = 8             # samples per row in grid.png
  c.eval.step = 0                  # TensorBoard step of the metrics
  c.eval.fidelity_reference = "teacher"  # row whose samples are the ODE solutions ('' = none)
  c.eval.lpips_weights = ""        # {encoder}_latest_vgg16_tuned.pth ('' = random: not a metric)
  c.eval.lpips_encoder = ""        # '' = from the pipeline family (sd15, sd21, sdxl)
  c.eval.diversity_prompts = 0     # K prompts (the first K captions) for diversity; 0 = off
  c.eval.diversity_seeds = 10      # S samples per diversity prompt
  c.eval.dreamsim = False          # DreamSim fidelity/diversity (needs the dreamsim package)
  c.eval.dreamsim_cache = ""       # folder holding DreamSim's downloaded weights
  c.eval.fid = ml_collections.ConfigDict()
  c.eval.fid.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth ('' = FID off)
  c.eval.fid.normalize = "clean"   # clean ((x-128)/128, clean-fid) | pytorch_fid (x/127.5-1)
  c.eval.fid.ref = ""              # real images: a folder or tfds:<name>/<split>
  c.eval.fid.ref_stats = ""        # or a precomputed .npz with mu, sigma (wins over ref)
  c.eval.fid.ref_data_dir = ""     # tfds data_dir of ref
  c.eval.fid.ref_image_key = "image"
  c.eval.fid.ref_limit = -1        # the first N reference images (-1: all)
  c.eval.fid.ref_center_crop = False  # centre square crop of each reference image
  c.eval.fid.ref_resolution = 0    # resize references to this square size first (0: no)
  c.eval.fid.ref_batch_size = 50
  c.eval.fid.cache_dir = ""        # '' = <workdir>/fid_stats
  c.eval.clip = ml_collections.ConfigDict()
  c.eval.clip.path = ""            # a transformers CLIPModel folder ('' = CLIP score off)
  c.eval.clip.scale = 1.0          # 1: cosine, as the paper (0.347); 100: torchmetrics
  return c


def eval_row(source: str, path: str = "", num_steps: int = 1,
             guidance_scale: float = 1.0) -> ml_collections.ConfigDict:
  """One row of the evaluation table (d2g_jax.evaluate.samplers.SOURCES)."""
  r = ml_collections.ConfigDict()
  r.source = source                # ddim | one_step
  r.path = path                    # the pipeline folder
  r.num_steps = num_steps          # ddim: DDIM steps (eta 0)
  r.guidance_scale = guidance_scale  # ddim: classifier-free guidance
  r.negative_prompt = ""           # ddim: the unconditional prompt
  return r
