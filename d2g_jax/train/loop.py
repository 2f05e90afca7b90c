"""The `train` stage: pairs in, a distilled one-step generator out, resumable at any moment.

    python -m d2g_jax.main --config configs/sd15.py --config.stages=train

`train.recipe` picks the data and the objective (`train.inputs`, `build.check_recipe`):
"diffusion2gan" reads the teacher's pairs; "gdd" reads real latents with captions (the
`real_latents` stage) and trains with the GAN loss alone. Everything else is shared.

Resume order (written down, as big_vision does):
  1. the run's config is checked against <workdir>/run_config.json (a different config
     fails before any work, listing what differs);
  2. mesh, teacher configs, objective and the abstract sharded state are built;
  3. if <workdir>/checkpoints has a complete step, state and data iterator are restored
     from it (the teacher's UNet weights are not even read); otherwise the state is
     created in its shards from the teacher's weights, at step 0;
  4. the loop runs from that step to `train.num_steps`: step i draws its randomness from
     fold_in(rng, i) and its batch from the restored iterator, so a resumed run repeats
     an uninterrupted one exactly (same machine, same mesh).

Checkpoints are saved every `train.checkpoint_every` steps and at the last step, only
after that step's metrics were checked finite, so a NaN never reaches a checkpoint.
SIGTERM (pre-emption, SLURM's requeue) saves the current step and stops cleanly; on several
hosts every host stops at the same step (`infra.preemption`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from tqdm import tqdm

from d2g_jax import distributed, parallel
from d2g_jax.infra import metrics as metrics_lib
from d2g_jax.infra import optim, preemption, run_config
from d2g_jax.infra.checkpoint import Checkpointer
from d2g_jax.log import get_logger
from d2g_jax.models.unet import init_shapes
from d2g_jax.teacher import load_teacher
from d2g_jax.train import build, inputs, samples

_log = get_logger(__name__)

# Keys that may change between runs of the same workdir: bookkeeping, not the result.
MUTABLE = ("stages", "distributed", "train.num_steps", "train.log_every", "train.sample_every",
           "train.checkpoint_every", "train.max_to_keep", "train.verify",
           "train.lock_stale_after_s", "export", "pairs.batch_size", "real.batch_size",
           "real.workers", "loss.allow_random_weights", "eval.allow_random_lpips")
METRICS_FILE = "metrics.jsonl"


def run_train(config) -> dict[str, Any]:
  """The train stage. Returns {"step", "checkpoint_dir", "metrics"} (last logged values)."""
  t = config.train
  build.check_recipe(config)
  run_config.ensure(config.workdir, config.to_dict(), ignore=MUTABLE,
                    process_index=jax.process_index())
  data = inputs.open_input(config)
  ckpt = Checkpointer(t.checkpoint_dir, max_to_keep=t.max_to_keep)
  start = ckpt.latest_step() or 0
  if start >= t.num_steps:
    _log.info("already done: checkpoint %d >= train.num_steps=%d in %s", start,
             t.num_steps, ckpt.directory)
    ckpt.close()
    return {"step": start, "checkpoint_dir": str(ckpt.directory), "metrics": {}}

  recompute_text = data.recompute_text
  fresh = start == 0
  components = ("vae",) + (("unet",) if fresh else ()) + (("text",) if recompute_text else ())
  teacher = load_teacher(config.teacher.path, components=components,
                         attention=t.attention)
  h, w, _ = data.latent_shape
  f = teacher.info.vae.downscale
  height, width = data.resolution or (h * f, w * f)
  time_ids = teacher.time_ids(1, height, width) if teacher.family == "sdxl" else None
  obj, consts = build.build_objective(config, teacher, time_ids=time_ids,
                                      recompute_text=recompute_text)

  mesh = parallel.make_mesh({"data": config.mesh.data, "fsdp": config.mesh.fsdp})
  local_batch = build.check_batch(t.batch_size, t.microbatches, mesh)
  teacher_abstract = init_shapes(teacher.info.unet)
  abstract, state_sh = build.state_shardings(obj, teacher_abstract, mesh, config.sharding)
  consts_sh = build.consts_shardings(consts, mesh, config.sharding)
  consts = parallel.place(consts, consts_sh) if jax.tree.leaves(consts) else consts

  log_sizes(abstract, t)
  ds = data.dataset(teacher, local_batch, seed=config.seed, verify=t.verify)
  it = iter(ds.to_iter_dataset())
  if fresh:
    _log.info("new run (%s): G and D from the teacher %s; %s", t.recipe,
             config.teacher.path, inputs.describe(data))
    state = build.create_state(obj, teacher.unet_params, state_sh,
                               jax.random.key(config.seed))
    teacher.unet_params = None  # the generator owns these weights now
  else:
    _log.info("resuming from checkpoint %d in %s", start, ckpt.directory)
    state = ckpt.restore(start, abstract, it)

  keys = data.keys(teacher)
  batch_sh = {k: parallel.batch_sharding(mesh) for k in keys}
  r1_steps = obj.gan_weight > 0 and obj.r1_gamma > 0
  step_fns = {r: build.jit_train_step(obj, state_sh, consts_sh, batch_sh, do_r1=r)
              for r in (False, True)}
  sampler = samples.TrainSamples(config, teacher, obj, data, mesh, state_sh, consts_sh)
  writer = metrics_lib.MetricWriter(os.path.join(config.workdir, "tensorboard"))
  mlog = metrics_lib.MetricsLog(config.workdir, start)
  cfg_dict = config.to_dict()
  last: dict[str, float] = {}
  pending = None
  timer = [time.time(), start]
  bar = tqdm(total=t.num_steps, initial=start, desc="train", unit="step",
             disable=jax.process_index() != 0, dynamic_ncols=True)

  def settle(step: int, device_metrics) -> None:
    nonlocal last
    try:
      values = metrics_lib.to_floats(step, device_metrics)
    except metrics_lib.NonFiniteError as e:
      ckpt.wait()
      raise metrics_lib.NonFiniteError(e.step, e.name, e.value) from None
    if step % t.log_every == 0 or step == t.num_steps:
      now = time.time()
      dt = (now - timer[0]) / max(step - timer[1], 1)
      timer[:] = [now, step]
      values.update({"perf/seconds_per_step": dt, "perf/pairs_per_second": t.batch_size / dt})
      writer.write_scalars(step, values)
      mlog.write(step, values)
      bar.set_postfix({k.split("/")[-1]: f"{values[k]:.3g}" for k in
                       ("g/regression", "g/gan", "d/loss") if k in values})
    last = values

  step = start
  try:
    with preemption.StopRequest() as stop:
      for step in range(start, t.num_steps):
        host = next(it)
        batch = parallel.host_to_global({k: host[k] for k in keys}, mesh)
        if step == start:
          compile_steps(step_fns, (state, consts, batch), r1_steps, start, t.num_steps,
                        obj.r1_interval)
        do_r1 = r1_steps and step % obj.r1_interval == 0
        state, device_metrics = step_fns[do_r1](state, consts, batch)
        if pending is not None:  # the previous step's metrics, while this one runs
          settle(*pending)
        pending = (step + 1, device_metrics)
        bar.update(1)
        done = step + 1
        stopping = stop.at(done)  # the same answer on every host
        if done % t.checkpoint_every == 0 or done == t.num_steps or stopping:
          settle(*pending)
          pending = None
          ckpt.save(done, state, it, config=cfg_dict)
        if stopping:
          break
        if t.sample_every and (done % t.sample_every == 0 or done == t.num_steps):
          image = sampler(state, consts, done)
          writer.write_images(done, {"samples/teacher_vs_student": image})
      if pending is not None:
        settle(*pending)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  final = int(jax.device_get(state.step))
  result = {"step": final, "checkpoint_dir": str(ckpt.directory), "metrics": last}
  if stop.requested and final < t.num_steps:
    raise preemption.Preempted(final, result)
  _log.info("step %d of %d; checkpoints in %s", final, t.num_steps, ckpt.directory)
  return result


def compile_steps(step_fns: dict, args: tuple, r1_steps: bool, start: int, stop: int,
                  interval: int) -> None:
  """Compiles the step programs this run calls (with and without R1) before the first step,
  every host then waiting for the others (`distributed.compile_then_wait`)."""
  needed = {r1_steps and step % interval == 0 for step in range(start, min(stop, start + interval))}
  began = time.time()
  for r in sorted(needed):
    distributed.compile_then_wait(step_fns[r], *args, name=f"train step (R1 {r})")
  _log.info("train step%s compiled in %.1f s", "s" if len(needed) > 1 else "",
            time.time() - began)


def log_sizes(abstract, t) -> None:
  """Trainable and frozen parameter counts and optimiser state sizes of G and D."""
  for name, params, opt, frozen in (("G", abstract.g_params, abstract.g_opt, t.g_frozen),
                                    ("D", abstract.d_params, abstract.d_opt, t.d_frozen)):
    n_train, n_frozen = optim.count_frozen(params, frozen)
    size = optim.state_size(opt)
    _log.info("%s: %s trainable and %s frozen parameters (frozen=%r); optimiser state %s "
             "values (%.1f MiB)", name, f"{n_train:,}", f"{n_frozen:,}", frozen, f"{size:,}",
             size * 4 / 2**20)
