"""The paper's SD 1.5 table: COCO FID-30k and CLIP score, teacher 50-step vs student one-step.

    python -m d2g_jax.main --config configs/eval_sd15.py --config.workdir=/runs/sd15 \
        --config.teacher.path=/models/stable-diffusion-v1-5 \
        --config.eval.student.path=/runs/sd15/student_pipeline \
        --config.eval.prompts=/data/coco2014_val_30k_captions.txt \
        --config.eval.fid.inception_weights=/weights/pt_inception-2015-12-05-6726825d.pth \
        --config.eval.fid.ref=/data/coco/val2014 \
        --config.eval.clip.path=/models/clip-vit-large-patch14 \
        --config.eval.lpips_weights=/weights/sd15_latest_vgg16_tuned.pth

Rows: the teacher (50-step DDIM, eta 0, CFG 3: the SD-CFG-3 pairs' teacher; set
--config.eval.teacher.guidance_scale to the CFG of your pairs) and the student exported
with `d2g_jax.convert.pipeline.export_pipeline` (one UNet call). Both see the same 30k
captions and the same noise, so the student's E-LatentLPIPS distance to the teacher is
its distance to the teacher's ODE solution. Killed, the same command resumes. Paper:
student FID-30k 9.29, teacher 8.74. On GPUs add --config.teacher.dtype=bfloat16.
"""

from d2g_jax import config_defaults


def get_config():
  config = config_defaults.base()
  config.workdir = "/tmp/d2g_sd15"
  config.stages = "eval"
  config.eval.rows = "teacher,student"
  config.eval.teacher.num_steps = 50
  config.eval.teacher.guidance_scale = 3.0
  config.eval.num_samples = 30000
  config.eval.diversity_prompts = 100
  config.eval.diversity_seeds = 10
  config.eval.batch_size = 64
  config.eval.fid.ref_center_crop = True   # COCO val2014 centre-cropped to 512 x 512
  config.eval.fid.ref_resolution = 512
  return config
