"""Compile a `programs.Program` and read what XLA's compiler says about it, per chip.

    r = report.compile_report(program, chip)    # a dict; r["fits"] False on HBM exhaustion
    report.largest_fitting(lambda b: compile_report(make(b), chip), start=16)

Memory (`compiled.memory_analysis()`, bytes per chip): arguments, outputs, the part of the
outputs aliased to donated arguments, temporaries, generated code; `peak_bytes` =
arguments + outputs - aliased + temporaries + code. A program fits when it compiles: XLA's
TPU compiler refuses one that does not fit the chip's HBM ("RESOURCE_EXHAUSTED: Ran out
of memory on HBM ... exceeds available HBM (95.74G)" for v5p), which is reported as
`fits: False` with that message. Cost (`compiled.cost_analysis()`):
HLO FLOPs per chip (everything the compiled program does, recomputation included), bytes
accessed, and the TPU compiler's `optimal_seconds`: its model of the step time, not a
measurement. The cost analysis counts the body of a loop once (the DDIM scan, the
microbatch scan of gradient accumulation), so these three are multiplied by `loop_scale`:
the reference's matmul FLOPs with every scan at its length over the same with each body
once (50 for the 50-step DDIM scan; the microbatches for accumulation, slightly
overcounting the optimiser update outside the loop).

Model FLOPs: the matmul and convolution FLOPs (2 per multiply-add) of the program's
reference twin (no rematerialisation, XLA attention), counted from its jaxpr and divided
by the chips: the work the step must do, whatever the implementation. Utilisation (MFU) =
model FLOPs per chip / estimated seconds / the chip's bf16 peak.

Pallas kernels: XLA costs a Mosaic kernel by the estimate the kernel declares. JAX's
flash-attention forward kernel declares one; its two backward kernels declare none, so
the compiler counts them as free. `kernel_seconds` adds them back: every flash kernel's
matmul FLOPs at the chip's peak scaled by the MXU fill of its head width (K / K rounded up
to 128: SD 1.5's K = 40 fills 31%), the forward's declared share replaced. `est_seconds`
= `optimal_seconds` + that correction.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from typing import Any, Callable

import jax

from d2g_jax.aot.target import Chip

LANES = 128
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# Flash-attention kernels: (q, k) -> matmul FLOPs per (b, n, t, s, k) element product.
FLASH_KERNELS = {"_flash_attention_kernel": 4, "_flash_attention_dkv_kernel": 8,
                 "_flash_attention_dq_kernel": 6}


# ------------------------------------------------------------------ jaxpr walks
def _sub_jaxprs(eqn, loops: bool = True):
  """(jaxpr, multiplier, is_branch) for every sub-jaxpr of an equation; a scan's body
  counts `length` times (once if not `loops`)."""
  name = eqn.primitive.name
  if name == "pallas_call":
    return  # its jaxpr is one grid step of the kernel, not the work
  mult = eqn.params.get("length", 1) if name == "scan" and loops else 1
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(item, "jaxpr", item)
      if hasattr(inner, "eqns"):
        yield inner, mult, name == "cond"


def matmul_flops(jaxpr, loops: bool = True) -> float:
  """dot_general and convolution FLOPs of a (closed) jaxpr, global: the body of a
  shard_map counts once per device, a scan's body `length` times (once if not `loops`),
  a cond's largest branch."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
    elif name == "conv_general_dilated":
      rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
      per_out = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_out
    subs = list(_sub_jaxprs(eqn, loops))
    scale = eqn.params["mesh"].size if name == "shard_map" else 1
    total += sum(scale * mult * matmul_flops(inner, loops) for inner, mult, branch in subs
                 if not branch)
    total += max((matmul_flops(inner, loops) for inner, _, branch in subs if branch),
                 default=0.0)
  return total


def pallas_kernels(jaxpr, mult: int = 1) -> list[dict]:
  """Every pallas_call of a jaxpr: kernel name, whether it declares a cost, and for the
  flash-attention kernels their matmul FLOPs per call site (shapes as the kernel sees them:
  per device inside a shard_map) and head width."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      info = eqn.params["jaxpr"].debug_info
      kernel = (getattr(info, "func_src_info", "") or "?").split(" ")[0]
      item = {"kernel": kernel, "costed": eqn.params.get("cost_estimate") is not None,
              "calls": mult, "flops": 0.0, "head_dim": None}
      if kernel in FLASH_KERNELS:
        b, n, t, k = eqn.invars[0].aval.shape
        s = eqn.invars[1].aval.shape[2]
        item.update(flops=mult * FLASH_KERNELS[kernel] * b * n * t * s * k, head_dim=k)
      out.append(item)
    for inner, m, _ in _sub_jaxprs(eqn):
      out += pallas_kernels(inner, mult * m)
  return out


def kernel_seconds(kernels: list[dict], chip: Chip | None) -> float:
  """Seconds the compiler's estimate leaves out for the flash kernels (see module doc)."""
  if chip is None:
    return 0.0
  extra = 0.0
  for kern in kernels:
    if not kern["flops"]:
      continue
    fill = kern["head_dim"] / (LANES * -(-kern["head_dim"] // LANES))
    modelled = kern["flops"] / (chip.bf16_flops * fill)
    extra += modelled - (kern["flops"] / chip.bf16_flops if kern["costed"] else 0.0)
  return extra


# ------------------------------------------------------------------ compiled program
def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in DTYPE_BYTES:
      total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collective ops of an optimised HLO module: count and result bytes per kind (async
  pairs counted once, at their start; bytes of the start's result tuple halved)."""
  counts, sizes = Counter(), Counter()
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) ([a-z-]+)\(", line)
    if not m:
      continue
    result, op = m.groups()
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base in COLLECTIVES and not op.endswith("-done"):
      counts[base] += 1
      sizes[base] += _shape_bytes(result) // (2 if op.endswith("-start") else 1)
  return {k: {"count": counts[k], "bytes": sizes[k]} for k in COLLECTIVES if counts[k]}


def _first(cost):
  return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})


def is_out_of_memory(error: Exception) -> bool:
  msg = str(error).lower()
  return "resource_exhausted" in msg or "out of memory" in msg or (
      "exceeds" in msg and "hbm" in msg)


def compile_report(program, chip: Chip | None, n_chips: int, hlo_dir: str = ""
                   ) -> dict[str, Any]:
  """Compile `program` for its mesh and read memory, cost, kernels and collectives; with
  `hlo_dir`, write the optimised HLO there (<name>_b<per-chip batch>.hlo.txt) to study."""
  t0 = time.perf_counter()
  traced = program.fn.trace(*program.args)
  lowered = traced.lower()
  r = {"program": program.name, "per_chip_batch": program.rows_per_chip, "note": program.note,
       "trace_lower_s": round(time.perf_counter() - t0, 1)}
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001  (only memory exhaustion is an answer; others raise)
    if not is_out_of_memory(e):
      raise
    r.update(fits=False, error=str(e).strip().splitlines()[0][:400],
             compile_s=round(time.perf_counter() - t1, 1))
    return r
  r["compile_s"] = round(time.perf_counter() - t1, 1)
  mem, cost = compiled.memory_analysis(), _first(compiled.cost_analysis())
  for key in ("argument", "output", "alias", "temp", "generated_code"):
    r[f"{key}_bytes"] = int(getattr(mem, f"{key}_size_in_bytes", 0) or 0)
  r["peak_bytes"] = (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                     + r["temp_bytes"] + r["generated_code_bytes"])
  reference = jax.make_jaxpr(program.reference)(*program.reference_args)
  r["model_flops"] = matmul_flops(reference) / n_chips
  # XLA's cost analysis counts a loop's body once (the DDIM scan, the microbatch scan):
  # scale it by the ratio of the matmul work with and without the trip counts.
  once = matmul_flops(reference, loops=False)
  r["loop_scale"] = loop_scale = r["model_flops"] * n_chips / once if once else 1.0
  r["hlo_flops"] = float(cost.get("flops", 0.0)) * loop_scale
  r["bytes_accessed"] = float(cost.get("bytes accessed", 0.0)) * loop_scale
  optimal = cost.get("optimal_seconds")
  r["optimal_seconds"] = None if optimal is None else float(optimal) * loop_scale
  kernels = pallas_kernels(traced.jaxpr)
  r["kernels"] = dict(Counter(k["kernel"] + ("" if k["costed"] else " (no cost)")
                              for k in kernels))
  r["kernel_seconds"] = kernel_seconds(kernels, chip)
  text = compiled.as_text()
  r["collectives"] = collectives(text)
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    r["hlo_file"] = os.path.join(hlo_dir, f"{program.name}_b{program.rows_per_chip}.hlo.txt")
    with open(r["hlo_file"], "w") as fh:
      fh.write(text)
  r["fits"] = chip is None or chip.compiler_checks_memory or r["peak_bytes"] <= chip.hbm_bytes
  if chip is not None:
    r["hbm_fraction"] = r["peak_bytes"] / chip.hbm_bytes
  if r["optimal_seconds"] is not None:
    r["est_seconds"] = float(r["optimal_seconds"]) + r["kernel_seconds"]
    if chip is not None:
      r["mfu"] = r["model_flops"] / r["est_seconds"] / chip.bf16_flops
      r["hlo_utilisation"] = r["hlo_flops"] / r["est_seconds"] / chip.bf16_flops
  return r


# ------------------------------------------------------------------ batch search
def largest_fitting(report_at: Callable[[int], dict], start: int, hbm_bytes: float,
                    limit: int = 1024) -> tuple[int | None, list[dict]]:
  """The largest per-chip batch whose program fits in `hbm_bytes`, with few compiles.

  From `start` (halved until it fits), a second compile at twice the batch gives a
  linear model of peak memory in the batch; its prediction is compiled and walked one by
  one to the boundary. If the doubled batch does not fit, the boundary is bisected.
  Returns (that batch or None, the reports of every compile, by batch)."""
  reports: dict[int, dict] = {}

  def fits(b: int) -> bool:
    if b not in reports:
      reports[b] = report_at(b)
    return bool(reports[b]["fits"])

  def result():
    best = max((k for k, r in reports.items() if r["fits"]), default=None)
    return best, [reports[k] for k in sorted(reports)]

  lo = start
  while not fits(lo):
    if lo == 1:
      return result()
    lo //= 2
  hi = min(2 * lo, limit)
  if hi == lo:
    return result()
  if not fits(hi):  # bisect (lo fits, hi does not)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return result()
  per_row = (reports[hi]["peak_bytes"] - reports[lo]["peak_bytes"]) / (hi - lo)
  b = limit if per_row <= 0 else \
      min(limit, hi + int((hbm_bytes - reports[hi]["peak_bytes"]) // per_row))
  if fits(b):
    while b < limit and fits(b + 1):
      b += 1
  else:
    while b > hi and not fits(b - 1):
      b -= 1
  return result()


# ------------------------------------------------------------------ the paper's recipe
def project_recipe(results: list[dict], n_chips: int, *, pairs: int = 3_000_000,
                   ddim_steps: int = 50, train_steps: int = 20_000, r1_interval: int = 16
                   ) -> dict[str, Any]:
  """Wall time of the paper's recipe on `n_chips` from compiled reports' estimates:
  pairs = ceil(pairs / (n_chips x b)) calls of `ddim_steps` x the `ddim_step` estimate (b
  pairs per chip), training = train_steps x ((1 - 1/r1_interval) x `train` + 1/r1_interval x
  `train_r1`) (`train` for both when `train_r1` was not compiled: then R1's cost is missing;
  `d_step` + `g_step` and `d_step_r1` + `g_step` when the halves were compiled apart).
  `results`: report dicts; the last fitting one of each program is used. The compiler's
  model, like its inputs: no measurement."""
  best = {r["program"]: r for r in results if r.get("fits") and r.get("est_seconds")}
  # The train step is D's update, then G's: its halves, compiled apart, add up to it.
  for whole, (d, g) in (("train", ("d_step", "g_step")), ("train_r1", ("d_step_r1", "g_step"))):
    if whole not in best and d in best and g in best:
      best[whole] = {"program": whole, "per_chip_batch": best[g]["per_chip_batch"],
                     "est_seconds": best[d]["est_seconds"] + best[g]["est_seconds"]}
  out: dict[str, Any] = {"n_chips": n_chips, "pairs": pairs, "ddim_steps": ddim_steps,
                         "train_steps": train_steps, "notes": []}
  if "ddim_step" in best:
    r = best["ddim_step"]
    calls = math.ceil(pairs / (n_chips * r["per_chip_batch"]))
    out["pairs_seconds"] = calls * ddim_steps * r["est_seconds"]
  else:
    out["notes"].append("no ddim_step estimate: pairs time unknown")
  if "train" in best:
    t = best["train"]["est_seconds"]
    t_r1 = best.get("train_r1", best["train"])["est_seconds"]
    if "train_r1" not in best:
      out["notes"].append("no train_r1 estimate: R1's extra cost (every "
                          f"{r1_interval} steps) not included")
    out["train_seconds"] = train_steps * ((1 - 1 / r1_interval) * t + t_r1 / r1_interval)
    out["global_batch"] = best["train"]["per_chip_batch"] * n_chips
  else:
    out["notes"].append("no train estimate: training time unknown")
  if "pairs_seconds" in out and "train_seconds" in out:
    out["total_seconds"] = out["pairs_seconds"] + out["train_seconds"]
  return out
