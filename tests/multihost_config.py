"""The tiny config of the multi-host tests (tests/test_many_hosts.py): pairs, train, export and
eval of a tiny SD 1 teacher, small enough for 2 processes x 2 CPU devices on a 2-core machine.

    launch/local.sh 2 2 -- --config tests/multihost_config.py --config.workdir=/tmp/mh \
        --config.teacher.path=/tmp/teacher --config.pairs.prompts=/tmp/prompts.txt
"""

from d2g_jax import config_defaults


def get_config():
  c = config_defaults.base()
  c.stages = "pairs,train,export,eval"
  c.pairs.num_steps = 2
  c.pairs.batch_size = 4
  c.pairs.shard_size = 4           # 4 shards of 16 pairs: 2 per host
  c.loss.name = "mse"
  c.train.num_steps = 6
  c.train.batch_size = 4
  c.train.warmup_steps = 2
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.sample_every = 0
  c.objective.r1_interval = 4      # steps 0 and 4 with R1
  c.sharding.min_size = 256
  c.eval.prompts = "{pairs.prompts}"
  c.eval.student.path = "{export.out_dir}"
  c.eval.num_samples = 8
  c.eval.batch_size = 4
  c.eval.shard_size = 4
  c.eval.teacher.num_steps = 2
  c.eval.allow_random_lpips = True
  c.eval.diversity_prompts = 2
  c.eval.diversity_seeds = 2
  return c
