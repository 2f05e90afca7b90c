"""A toy training run through the project's Checkpointer, for the exact-resume test.

    python tests/resume_worker.py WORKDIR [--steps 24] [--every 4] [--sleep 0]

A linear model trained with Adam on a fixed regression set, fed by a shuffled, repeated,
batched grain MapDataset. Every `--every` steps (and at the last step) the state and the
iterator are checkpointed; each step appends `{"step", "loss"}` (loss as float.hex, so
equality is bit equality) to WORKDIR/losses.jsonl and prints "step N". Started again with
the same command, it resumes from the latest checkpoint. At the end it writes the final
parameters to WORKDIR/final.npz. The test kills it (SIGKILL) mid-run and compares with an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

N, D, BATCH = 40, 4, 8  # 5 batches per epoch: resumes cross epoch boundaries


def dataset(seed: int = 0):
  import grain
  import numpy as np
  rng = np.random.default_rng(seed)
  x_NxD = rng.standard_normal((N, D)).astype(np.float32)
  y_N = (x_NxD @ rng.standard_normal(D) + 0.1 * rng.standard_normal(N)).astype(np.float32)
  ds = grain.MapDataset.range(N).shuffle(seed=seed).repeat(None)
  ds = ds.map(lambda i: {"x": x_NxD[i], "y": y_N[i]}).batch(BATCH)
  return ds.to_iter_dataset()


def run(workdir: str, steps: int, every: int, sleep: float):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from d2g_jax.infra import checkpoint

  tx = optax.adam(0.05)

  def init():
    params = {"w": jnp.zeros((D,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def train_step(state, batch):
    def loss_fn(p):
      return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt,
            "step": state["step"] + 1}, loss

  step_fn = jax.jit(train_step, donate_argnums=0)
  it = iter(dataset())
  state = jax.jit(init)()
  losses = os.path.join(workdir, "losses.jsonl")
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2) as ckpt:
    # Resume order: 1. the workdir's latest checkpoint; 2. a fresh start.
    if (latest := ckpt.latest_step()) is not None:
      state = ckpt.restore(latest, checkpoint.abstract_like(state), data_iterator=it)
      print(f"resumed from step {latest}", flush=True)
    with open(losses, "a") as log:
      for step in range(int(state["step"]) + 1, steps + 1):
        batch = next(it)
        state, loss = step_fn(state, batch)
        log.write(json.dumps({"step": step, "loss": float(loss).hex()}) + "\n")
        log.flush()
        if step % every == 0 or step == steps:
          ckpt.save(step, state, data_iterator=it)
        print(f"step {step}", flush=True)
        time.sleep(sleep)
  np.savez(os.path.join(workdir, "final.npz"), **jax.device_get(state["params"]))


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--steps", type=int, default=24)
  parser.add_argument("--every", type=int, default=4)
  parser.add_argument("--sleep", type=float, default=0.0)
  args = parser.parse_args()
  run(args.workdir, args.steps, args.every, args.sleep)
