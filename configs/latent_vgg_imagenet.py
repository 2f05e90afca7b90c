"""E-LatentLPIPS for a VAE of your own: ImageNet classification on its latents, then the LPIPS
heads calibrated on BAPPS 2AFC judgments.

    python -m d2g_jax.main --config configs/latent_vgg_imagenet.py \
        --config.latent_vgg.vae=/models/my-vae --config.latent_vgg.encoder=sd15 \
        --config.latent_vgg.cache.tfds_data_dir=/data/tfds \
        --config.latent_vgg.cache.bapps=/data/bapps --config.workdir=/runs/elatentlpips

Stages: latent_cache (ImageNet train / validation and BAPPS 2afc train / val, encoded by the
VAE's posterior mean, scaled as the diffusion model sees latents), latent_vgg_train (VGG16-BN
with torchvision's classifier head, SGD, 90 epochs, batch 256) and latent_vgg_calibrate
(LPIPS's ranking objective, 5 + 5 epochs). ImageNet is read with tensorflow-datasets from
its ArrayRecord files (`tfds build imagenet2012 --file_format=array_record`, with the
archives placed in the manual folder as tfds asks); an image folder works too:
--config.latent_vgg.cache.train=folder:/data/imagenet/train (one subfolder per class).
`encoder` names the latent family (sd15, sd21, sdxl: 4 channels; sd3, flux: 16) the weights
are written for; the VAE's latent channels must match. The loss then loads with
--config.loss.weights=<workdir>/latent_vgg. On accelerators add
--config.latent_vgg.vae_dtype=bfloat16 --config.latent_vgg.train.dtype=bfloat16.
"""

from d2g_jax import config_defaults


def get_config():
  config = config_defaults.base()
  config.workdir = "/tmp/d2g_elatentlpips"
  config.stages = "latent_cache,latent_vgg_train,latent_vgg_calibrate"
  lv = config.latent_vgg
  lv.encoder = "sd15"
  lv.cache.train = "tfds:imagenet2012/train"
  lv.cache.eval = "tfds:imagenet2012/validation"
  lv.cache.image_size = 256             # SD VAEs: 32x32 latents
  lv.cache.batch_size = 64
  lv.train.head = "vgg"                 # torchvision's classifier: the official file layout
  lv.train.batch_size = 256
  lv.train.epochs = 90
  lv.train.lr = 0.01
  lv.train.lr_decay_epochs = (30, 60)
  # Latents are cached from centre crops: flips, 90-degree rotations, translations and the
  # geometric group (the E-LatentLPIPS ensemble's "bg") stand in for torchvision's pixel-space
  # random crops and flips.
  lv.train.augment = "bg"
  lv.train.augment_p = 0.5
  return config
