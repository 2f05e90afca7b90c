"""Every option and its default, in one place; configs/*.py start from `base()`.

Paths left empty are derived from `workdir` by `run.resolve()`:
teacher.path '' -> <workdir>/teacher, pairs.out_dir '' -> <workdir>/pairs,
latent_vgg.out_dir '' -> <workdir>/latent_vgg, latent_vgg.vae '' -> <teacher.path>/vae.
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

  # Training E-LatentLPIPS for a VAE: stages latent_cache, latent_vgg_train, latent_vgg_calibrate.
  c.latent_vgg = lv = ml_collections.ConfigDict()
  lv.out_dir = ""                  # caches, checkpoints, results and the weights
  lv.encoder = "sd15"              # latent family the weights are for: sd15|sd21|sdxl|sd3|flux
  lv.vae = ""                      # diffusers AutoencoderKL folder ('' = <teacher.path>/vae)
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
