"""Every option and its default, in one place; configs/*.py start from `base()`.

A string value may name another option in braces: `{workdir}` or a dotted key such as
`{pairs.out_dir}`. `substitute()` (called by `run.resolve()`) replaces them, so every path
that lives in the workdir by default is written here as "{workdir}/...", and a config file or
a command line can name places inside a workdir given elsewhere.

Where a default is not the paper's (it publishes neither), docs/training.md says where it
comes from."""

import re

import ml_collections

from d2g_jax.demo import config as demo_config


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "/tmp/d2g"
  c.seed = 0
  c.stages = "pairs"
  # Multi-host runs: one process per host, each running the same command (d2g_jax/distributed.py,
  # docs/many_hosts.md). Each cluster setting: the config, else the environment, else JAX's
  # detection of the cluster (Cloud TPU, SLURM, ...).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False    # True: jax.distributed.initialize() before any stage
  c.distributed.coordinator_address = ""  # process 0's host:port; '' = $D2G_COORDINATOR_ADDRESS,
                                   # $JAX_COORDINATOR_ADDRESS or detected
  c.distributed.num_processes = 0  # 0 = $D2G_NUM_PROCESSES or detected
  c.distributed.process_id = -1    # -1 = $D2G_PROCESS_ID or detected
  c.distributed.initialization_timeout_s = 300  # how long to wait for every process to join
  c.distributed.heartbeat_timeout_s = 100  # a process silent this long counts as lost: every
                                   # other process stops with an error naming it
  c.distributed.shutdown_timeout_s = 300   # how long a finished process waits for the others
  c.compilation_cache_dir = ""     # XLA's persistent compilation cache ('' = off); a rerun
                                   # (or a resumed run) then skips compiling its steps

  c.teacher = ml_collections.ConfigDict()
  c.teacher.path = "{workdir}/teacher"  # a diffusers pipeline folder (model_index.json, unet/, ...)
  c.teacher.dtype = "float32"      # compute dtype: float32, or bfloat16 on accelerators
  c.teacher.attention = "auto"     # auto (flash on TPU, cudnn on GPU bf16, chunked on CPU)
                                   # | xla | cudnn | chunked | flash
  c.teacher.tiny_family = "sd1"    # tiny_teacher stage only: sd1 | sd2 | sdxl

  demo_config.add_blocks(c)       # the digits demo's blocks: digits, demo (d2g_jax/demo/config.py)

  c.pairs = ml_collections.ConfigDict()
  c.pairs.prompts = ""             # prompts.txt | prompts.jsonl | tfds:<name>[/<config>]/<split>
  c.pairs.prompt_field = ""        # JSONL field ('' = "prompt", else "caption")
  c.pairs.tfds_data_dir = ""       # where the tfds dataset was prepared
  c.pairs.caption_key = ""         # tfds feature path, e.g. captions/text ('' = auto)
  c.pairs.all_captions = False     # tfds: every caption of an example, not only the first
  c.pairs.num_pairs = -1           # -1: one pair per prompt
  c.pairs.out_dir = "{workdir}/pairs"
  c.pairs.guidance_scale = 3.0     # the paper's SD-CFG-3 (8.0 for SD-CFG-8)
  c.pairs.num_steps = 50           # DDIM steps, eta = 0: the teacher's ODE
  c.pairs.eta = 0.0
  c.pairs.height = 0               # pixels; 0 = the teacher's default (512 SD 1.5, 1024 SDXL)
  c.pairs.width = 0
  c.pairs.batch_size = 8           # global; a multiple of the number of devices
  c.pairs.shard_size = 1024        # pairs per ArrayRecord shard
  c.pairs.store_embeddings = True  # store text embeddings beside the token ids
  c.pairs.negative_prompt = ""     # the unconditional prompt of CFG

  # The device mesh of training: one of the two sizes may be -1 (all remaining devices).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # data parallelism (replicas)
  c.mesh.fsdp = 1                  # parameters, EMA and optimiser states split over this axis
  c.sharding = ml_collections.ConfigDict()
  # (regex over '/'-joined state paths, strategy), first match wins: fsdp | replicate.
  c.sharding.rules = ((".*", "fsdp"),)
  c.sharding.min_size = 2 ** 14    # smaller leaves are replicated

  c.generator = ml_collections.ConfigDict()
  c.generator.timestep = 999       # the UNet's timestep in G(z, c) (the last training timestep)
  c.generator.parameterization = "auto"  # auto (the teacher's eps / v) | epsilon | v_prediction | sample (x0)

  c.discriminator = ml_collections.ConfigDict()
  c.discriminator.z_cond = True             # zero-init conv on z added to D's input
  c.discriminator.multiscale_input = True   # x resized into every down block (zero-init convs)
  c.discriminator.multiscale_output = True  # 3 readouts per decoder scale (else 1 at the end)
  c.discriminator.timestep = 0     # D's UNet timestep: its inputs are clean latents (t = 0)
  c.discriminator.diffuse = False  # noise D's inputs to t ~ U{diffuse_t_min..diffuse_t_max}
  c.discriminator.diffuse_t_min = 0
  c.discriminator.diffuse_t_max = 999

  # The regression loss (d2g_jax.losses.perceptual).
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "e_latent_lpips"   # mse | pseudo_huber | lpips | latent_lpips | e_latent_lpips
  c.loss.encoder = "sd15"          # E-LatentLPIPS trunk: sd15 | sd21 | sdxl | sd3 | flux
  c.loss.weights = ""              # E-LatentLPIPS .pth / folder / .safetensors (required, see below)
  c.loss.augment = "bg"            # augmentation groups of the ensemble: b, g, c, o, bg, bgc, bgco
  c.loss.augment_p = 1.0           # probability multiplier of each augmentation
  c.loss.l1 = True                 # add mean |a - b| as the official package does
  c.loss.huber_c = 0.0             # pseudo_huber c; 0 = 0.00054 * sqrt(H*W*C)
  c.loss.raw_latents = False       # True if the latents are unscaled VAE-encoder outputs
  c.loss.lpips_vgg = ""            # pixel lpips: torchvision vgg16 state dict (required, see below)
  c.loss.lpips_heads = "default"   # pixel lpips heads; "default" = the lpips package's, "" = none
  c.loss.allow_random_weights = False  # True: an empty loss.weights (lpips: loss.lpips_vgg) trains
                                   # with a RANDOMLY initialised loss network instead of failing
                                   # (tests, benchmarks; never the paper's loss)

  c.objective = ml_collections.ConfigDict()
  c.objective.regression_weight = 1.0  # weight of the regression loss in G's objective
  c.objective.gan_weight = 0.1     # weight of the non-saturating GAN loss in G's objective
  c.objective.r1_gamma = 1.0       # R1 weight gamma (the penalty is interval * gamma / 2 * |grad|^2)
  c.objective.r1_interval = 16     # lazy R1: every N steps (StyleGAN2)
  c.objective.r1_samples = 1       # R1 on this many samples of the batch (the paper: 1)
  c.objective.mix_fraction = 0.25  # fake rows whose latent is swapped for another row's

  c.train = ml_collections.ConfigDict()
  c.train.recipe = "diffusion2gan"  # diffusion2gan (teacher pairs: regression + GAN) | gdd (real
                                   # latents, GAN only: GDD / GDD-I, arXiv 2405.20750; see gdd())
  c.train.pairs = "{pairs.out_dir}"  # pair dataset folder
  c.train.checkpoint_dir = "{workdir}/checkpoints"  # Orbax checkpoints (export and eval read them)
  c.train.num_steps = 20000
  c.train.batch_size = 64          # global; a multiple of the devices along (data, fsdp)
  c.train.microbatches = 1         # gradient accumulation: each update over k sequential parts
                                   # of the batch (1/k of the activations; batch_size / devices
                                   # must be a multiple of k)
  c.train.g_lr = 1e-5
  c.train.d_lr = 1e-5
  c.train.adam_b1 = 0.0            # GAN practice (StyleGAN2, GigaGAN): no first-moment momentum
  c.train.adam_b2 = 0.99
  c.train.adam_eps = 1e-8
  c.train.weight_decay = 0.0       # > 0: AdamW
  c.train.warmup_steps = 500       # linear learning-rate warm-up from 0
  c.train.grad_clip = 1.0          # global-norm clipping (0 = off)
  c.train.g_frozen = ""            # regex of generator params kept frozen ('' = none;
                                   # "gdd_i" = GDD-I's preset, train.optim.FROZEN_PRESETS)
  c.train.d_frozen = ""            # regex of discriminator params kept frozen
  c.train.ema_decay = 0.999        # EMA of the generator (what is exported)
  c.train.dtype = "float32"        # compute dtype of G and D: float32 | bfloat16 (params fp32)
  c.train.attention = "auto"       # auto | xla | cudnn | chunked | flash (auto: flash on TPU)
  c.train.remat = False            # rematerialise every UNet block in the backward pass
  c.train.checkpoint_every = 1000
  c.train.max_to_keep = 3
  c.train.log_every = 50
  c.train.sample_every = 1000      # PNG grid of teacher target vs generator (0 = never)
  c.train.num_samples = 8          # validation pairs in the grid (the dataset's first ones)
  c.train.verify = "size"          # pair shard check when opening: none | size | sha256
  c.train.lock_stale_after_s = 300  # another host's lock without a heartbeat for this long is stale


  # GDD's real data: images with captions -> the teacher VAE's latents (stage real_latents).
  c.real = ml_collections.ConfigDict()
  c.real.images = ""               # captioned:<root> (x.png + x.txt) | tfds:<name>/<split> |
                                   # folder:<root> (class subfolders) with caption_template
  c.real.tfds_data_dir = ""        # where the tfds dataset was prepared
  c.real.image_key = "image"       # tfds image feature
  c.real.caption_key = ""          # tfds caption feature path, e.g. captions/text (the first one)
  c.real.label_key = "label"       # tfds ClassLabel feature, used with caption_template
  c.real.caption_template = ""     # labelled sources: caption = template.format(class name)
  c.real.image_size = 0            # square crop in pixels; 0 = the teacher's default resolution
  c.real.num_examples = -1         # evenly spaced subset (-1: all)
  c.real.dtype = "float32"         # stored latents: float32 | bfloat16 | float16
  c.real.vae_dtype = "float32"     # VAE compute dtype: float32 | bfloat16
  c.real.batch_size = 32           # global encoding batch (a multiple of the devices)
  c.real.shard_size = 1024         # examples per ArrayRecord shard
  c.real.workers = 8               # host threads decoding and resizing images
  c.real.out_dir = "{workdir}/real_latents"  # the train stage reads it (gdd)

  c.export = ml_collections.ConfigDict()
  c.export.out_dir = "{workdir}/export"  # diffusers pipeline folder
  c.export.orbax_dir = "{workdir}/export_orbax"  # Orbax copy of the exported UNet params
  c.export.weights = "ema"         # ema | generator
  c.export.dtype = "float32"       # weights of the exported UNet: float32 | float16 | bfloat16
  # eval: the paper's tables (docs/evaluation.md); one block per row, in eval.rows order.
  c.eval = ml_collections.ConfigDict()
  c.eval.out_dir = "{workdir}/eval"
  c.eval.rows = "teacher,student"  # table rows, each a block below (configs may add blocks)
  c.eval.teacher = eval_row("ddim", "{teacher.path}", num_steps=50, guidance_scale=3.0)
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
  c.eval.lpips_weights = ""        # {encoder}_latest_vgg16_tuned.pth: fidelity and diversity
  c.eval.allow_random_lpips = False  # True: without lpips_weights, measure them with a RANDOM
                                   # LatentLPIPS (not a metric: tests only) instead of failing
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
  c.eval.fid.cache_dir = "{workdir}/fid_stats"
  c.eval.clip = ml_collections.ConfigDict()
  c.eval.clip.path = ""            # a transformers CLIPModel folder ('' = CLIP score off)
  c.eval.clip.scale = 1.0          # 1: cosine, as the paper (0.347); 100: torchmetrics
  # Training E-LatentLPIPS for a VAE: stages latent_cache, latent_vgg_train, latent_vgg_calibrate.
  c.latent_vgg = lv = ml_collections.ConfigDict()
  lv.out_dir = "{workdir}/latent_vgg"  # caches, checkpoints, results and the weights
  lv.encoder = "sd15"              # latent family the weights are for: sd15|sd21|sdxl|sd3|flux
  lv.vae = "{teacher.path}/vae"    # diffusers AutoencoderKL folder
  lv.vae_dtype = "float32"         # VAE compute dtype: float32 | bfloat16
  lv.widths = (64, 128, 256, 512, 512)  # trunk block widths; VGG16's is the official layout

  lv.cache = ml_collections.ConfigDict()
  lv.cache.train = ""              # folder:<root> (one subfolder per class) | tfds:<name>/<split>
  lv.cache.eval = ""               # the held-out split, same forms
  lv.cache.tfds_data_dir = ""      # where the tfds dataset was prepared
  lv.cache.image_key = "image"     # tfds image feature
  lv.cache.label_key = "label"     # tfds ClassLabel feature
  lv.cache.image_size = 256        # shorter side resized, then centre-cropped to this square
  lv.cache.num_train = -1          # evenly spaced subset of the train source (-1: all)
  lv.cache.num_eval = -1
  lv.cache.bapps = ""              # BAPPS root holding 2afc/{train,val} ('' = no calibration data)
  lv.cache.bapps_image_size = 64   # BAPPS patches are 64x64
  lv.cache.num_bapps = -1          # evenly spaced subset of each BAPPS split (-1: all)
  lv.cache.dtype = "float32"       # stored latents: float32 | bfloat16 | float16
  lv.cache.batch_size = 32         # global encoding batch (a multiple of the devices)
  lv.cache.shard_size = 1024       # examples per ArrayRecord shard
  lv.cache.workers = 8             # host threads decoding and resizing images

  lv.train = ml_collections.ConfigDict()
  lv.train.head = "vgg"            # vgg (torchvision's classifier) | linear (pool + one layer)
  lv.train.hidden = 4096           # vgg head width
  lv.train.dropout = 0.5
  lv.train.batch_size = 256        # global
  lv.train.epochs = 90
  lv.train.num_steps = -1          # -1: epochs x (train examples // batch_size)
  lv.train.optimizer = "sgd"       # sgd (momentum) | adamw
  lv.train.lr = 0.01
  lv.train.momentum = 0.9          # sgd momentum; adamw's beta1
  lv.train.weight_decay = 1e-4
  lv.train.warmup_steps = 0        # linear warm-up
  lv.train.lr_decay_epochs = (30, 60)  # multiply the lr by lr_decay at these epochs
  lv.train.lr_decay = 0.1
  lv.train.augment = ""            # latent augmentations per sample: b, g, c, o letters ('' = off)
  lv.train.augment_p = 1.0         # probability multiplier of each augmentation
  lv.train.bn_momentum = 0.9       # running statistics (torch's momentum 0.1)
  lv.train.dtype = "float32"       # compute dtype: float32 | bfloat16
  lv.train.log_every = 100
  lv.train.eval_every = 5000       # steps between held-out top-1 evaluations (and at the end)
  lv.train.checkpoint_every = 1000
  lv.train.keep_checkpoints = 3
  lv.train.eval_batch_size = 256   # global

  lv.calibrate = ml_collections.ConfigDict()
  lv.calibrate.trunk = ""          # trunk to calibrate ('' = latent_vgg_train's); any file
                                   # load_latent_lpips reads, e.g. an official .pth.tar
  lv.calibrate.batch_size = 64     # global (LPIPS: 50; a multiple of the devices here)
  lv.calibrate.epochs = 5          # at the full learning rate (LPIPS: 5) ...
  lv.calibrate.decay_epochs = 5    # ... then linearly to 0 (LPIPS: 5)
  lv.calibrate.lr = 1e-4           # Adam (LPIPS: 1e-4, beta1 0.5)
  lv.calibrate.beta1 = 0.5
  lv.calibrate.hidden = 32         # width of the judgment network on (d0, d1)
  lv.calibrate.dropout = 0.0       # dropout on the per-channel features (LPIPS drops pixels)
  lv.calibrate.feature_batch_size = 64  # global, trunk feature pass
  return c


def gdd(c: ml_collections.ConfigDict, innate: bool = True) -> ml_collections.ConfigDict:
  """`c` switched to the GDD recipe (GDD-I with `innate`: frozen convolutions), with the
  optimiser settings of the GDD authors' ImageNet 64x64 runs (arXiv 2405.20750; official
  code github.com/Zyriix/GDD, train.sh: Adam betas (0, 0.99), eps 1e-8, G lr 8e-6, D lr
  4e-5, R1 gamma 1e-4 every 16 steps, batch 512, 10M images, no warm-up, no clipping).
  docs/gdd.md says what differs from the paper and why."""
  c.train.recipe = "gdd"
  c.objective.regression_weight = 0.0  # no teacher targets: the GAN loss alone
  c.objective.gan_weight = 1.0
  c.objective.mix_fraction = 0.0     # mix-and-match and z-conditioning need (z, x) pairs
  c.discriminator.z_cond = False
  c.objective.r1_gamma = 1e-4
  c.objective.r1_interval = 16
  c.train.adam_b1, c.train.adam_b2, c.train.adam_eps = 0.0, 0.99, 1e-8
  c.train.g_lr = 8e-6
  c.train.d_lr = 4e-5
  c.train.batch_size = 512
  c.train.num_steps = 20000          # 10.2M images at batch 512 (the paper: 10M)
  c.train.warmup_steps = 0
  c.train.grad_clip = 0.0
  c.train.g_frozen = "gdd_i" if innate else ""
  return c


def eval_row(source: str, path: str = "", num_steps: int = 1,
             guidance_scale: float = 1.0) -> ml_collections.ConfigDict:
  """One row of the evaluation table (d2g_jax.evaluate.samplers.SOURCES)."""
  r = ml_collections.ConfigDict()
  r.source = source                # ddim | one_step | checkpoint
  r.path = path                    # the pipeline folder (checkpoint: the checkpoints folder,
                                   # '' = train.checkpoint_dir; the teacher is teacher.path)
  r.num_steps = num_steps          # ddim: DDIM steps (eta 0)
  r.guidance_scale = guidance_scale  # ddim: classifier-free guidance
  r.negative_prompt = ""           # ddim: the unconditional prompt
  return r


_REFERENCE = re.compile(r"\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")


def substitute(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy in which every `{key}` inside a string value (`{workdir}`, `{pairs.out_dir}`, ...)
  is replaced by that option's value, itself substituted first. Braces that name no string
  option (a prompt template's `{}`) are left alone; a reference cycle is an error."""
  tree = config.to_dict()
  flat: dict[str, str] = {}

  def collect(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        collect(v, f"{prefix}{k}.")
      elif isinstance(v, str):
        flat[prefix + k] = v
  collect(tree, "")
  done: dict[str, str] = {}

  def text(s: str, chain: tuple[str, ...]) -> str:
    return _REFERENCE.sub(lambda m: value(m[1], chain) if m[1] in flat else m[0], s)

  def value(key: str, chain: tuple[str, ...]) -> str:
    if key in chain:
      raise ValueError("config values refer to each other in a cycle: " +
                       " -> ".join(f"{{{k}}}" for k in (*chain[chain.index(key):], key)))
    if key not in done:
      done[key] = text(flat[key], (*chain, key))
    return done[key]

  def rebuild(node, key):
    if isinstance(node, dict):
      return {k: rebuild(v, f"{key}.{k}" if key else k) for k, v in node.items()}
    if isinstance(node, str):
      return value(key, ()) if key in flat else text(node, ())
    if isinstance(node, (list, tuple)):
      return type(node)(rebuild(v, None) for v in node)
    return node
  return ml_collections.ConfigDict(rebuild(tree, ""))
