"""The paper's SDXL table: COCO FID-5k and CLIP score (cosine: 0.347), teacher vs one-step student.

    python -m d2g_jax.main --config configs/eval_sdxl.py --config.workdir=/runs/sdxl \
        --config.teacher.path=/models/stable-diffusion-xl-base-1.0 \
        --config.eval.student.path=/runs/sdxl/student_pipeline \
        --config.eval.prompts=/data/coco2014_val_5k_captions.txt \
        --config.eval.fid.inception_weights=/weights/pt_inception-2015-12-05-6726825d.pth \
        --config.eval.fid.ref=/data/coco/val2014 \
        --config.eval.clip.path=/models/CLIP-ViT-g-14-laion2B-s12B-b42K \
        --config.eval.lpips_weights=/weights/sdxl_latest_vgg16_tuned.pth

1024 x 1024 samples (SDXL's default). CLIP score is the clipped cosine (scale 1), the
convention of the paper's 0.347; --config.eval.clip.scale=100 gives torchmetrics'. Paper:
student FID-5k 25.49, CLIP 0.347. bfloat16 compute on accelerators.
"""

from d2g_jax import config_defaults


def get_config():
  config = config_defaults.base()
  config.workdir = "/tmp/d2g_sdxl"
  config.stages = "eval"
  config.teacher.dtype = "bfloat16"
  config.eval.rows = "teacher,student"
  config.eval.teacher.num_steps = 50
  config.eval.teacher.guidance_scale = 3.0
  config.eval.num_samples = 5000
  config.eval.diversity_prompts = 100
  config.eval.diversity_seeds = 10
  config.eval.batch_size = 32
  config.eval.shard_size = 512
  config.eval.fid.ref_center_crop = True
  config.eval.fid.ref_resolution = 1024
  return config
