"""The tiny configs of the multi-host tests (tests/test_many_hosts.py), small enough for
2 processes x 2 CPU devices on a 2-core machine.

    launch/local.sh 2 2 -- --config tests/multihost_config.py --config.workdir=/tmp/mh \
        --config.teacher.path=/tmp/teacher --config.pairs.prompts=/tmp/prompts.txt
    launch/local.sh 2 2 -- --config tests/multihost_config.py:gdd ... \
        --config.real.images=captioned:/tmp/images
    launch/local.sh 2 2 -- --config tests/multihost_config.py:latent_vgg ... \
        --config.latent_vgg.vae=/tmp/teacher/vae --config.latent_vgg.cache.train=folder:/tmp/digits \
        --config.latent_vgg.cache.eval=folder:/tmp/digits --config.latent_vgg.cache.bapps=/tmp/bapps

Variants: '' (pairs, train, export, eval of a tiny SD 1 teacher), 'gdd' (real_latents, then the
GDD-I recipe's train), 'latent_vgg' (latent_cache, latent_vgg_train, latent_vgg_calibrate).
"""

from d2g_jax import config_defaults


def get_config(variant: str = ""):
  c = config_defaults.base()
  c.loss.name = "mse"
  c.train.num_steps = 12
  c.train.batch_size = 4
  c.train.warmup_steps = 2
  c.train.g_lr = c.train.d_lr = 1e-4
  c.export.weights = "generator"   # the EMA of a dozen steps is still the teacher
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.sample_every = 0
  c.objective.r1_gamma = 0.0       # one train step program to compile
  c.sharding.min_size = 256
  if variant == "":
    c.stages = "pairs,train,export,eval"
    c.pairs.num_steps = 2
    c.pairs.batch_size = 4
    c.pairs.shard_size = 4         # 4 shards of 16 pairs: 2 per host
    c.eval.prompts = "{pairs.prompts}"
    c.eval.student.path = "{export.out_dir}"
    c.eval.num_samples = 8
    c.eval.batch_size = 4
    c.eval.shard_size = 4
    c.eval.teacher.num_steps = 2
    c.eval.allow_random_lpips = True
    c.eval.diversity_prompts = 2
    c.eval.diversity_seeds = 2
  elif variant == "gdd":
    config_defaults.gdd(c, innate=True)
    c.stages = "real_latents,train"
    c.real.batch_size = 4
    c.real.shard_size = 4
    c.real.workers = 2
    c.train.batch_size, c.train.num_steps, c.train.checkpoint_every = 4, 4, 2
    c.train.g_lr = c.train.d_lr = 1e-3
    c.objective.r1_gamma = 0.0
  elif variant == "latent_vgg":
    c.stages = "latent_cache,latent_vgg_train,latent_vgg_calibrate"
    lv = c.latent_vgg
    lv.widths = (8, 8, 16, 16, 16)
    lv.cache.image_size = 16
    lv.cache.bapps_image_size = 16
    lv.cache.batch_size = lv.cache.shard_size = 4
    lv.cache.workers = 2
    t = lv.train
    t.head, t.batch_size, t.epochs, t.optimizer, t.lr = "linear", 8, 2, "adamw", 0.02
    t.weight_decay, t.augment = 0.0, "b"
    t.log_every, t.eval_every, t.checkpoint_every, t.eval_batch_size = 2, 100, 2, 8
    cal = lv.calibrate
    cal.batch_size, cal.epochs, cal.decay_epochs, cal.lr = 8, 2, 1, 0.01
    cal.feature_batch_size = 8
  else:
    raise ValueError(f"variant {variant!r}: expected '', 'gdd' or 'latent_vgg'")
  return c
