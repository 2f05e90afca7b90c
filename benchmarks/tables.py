"""The docs' tables of measured and estimated numbers, generated from benchmarks/results/*.jsonl.

    python benchmarks/tables.py            # rewrite every table in README.md and docs/*.md
    python benchmarks/tables.py --check    # exit 1, naming the stale tables, if the docs differ
    python benchmarks/tables.py --list     # the table names and the results files they read

A table lives in a page between two marker lines, `<!-- table:NAME -->` and
`<!-- /table:NAME -->`; everything between them is this script's and is replaced. A results
file holds one JSON record per line: `train_compile_v5p.jsonl` as `benchmarks/train_compile.py
--json` writes it, the others as the benchmarks' `--record PATH` writes them
(`benchmarks/common.py`: `record`); a benchmark's table gathers every file of its name
(`unet_forward_*.jsonl`: one per machine, say). Each benchmark table is followed by one line
per run naming its date, processor or device, command and source, so a figure transcribed from
an old README says so. To add a run, pass `--record benchmarks/results/<name>_<machine>.jsonl`
to the benchmark and run this script.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# A marker is a line of its own (so a page may quote one inline).
MARKER = re.compile(r"^<!-- table:([\w-]+) -->\n(.*?)^<!-- /table:\1 -->$", re.S | re.M)
OPEN = re.compile(r"^<!-- table:([\w-]+) -->$", re.M)
CLOSE = re.compile(r"^<!-- /table:([\w-]+) -->$", re.M)


# ------------------------------------------------------------------ reading and formatting
def load(pattern: str) -> list[dict]:
  """The records of the files benchmarks/results/`pattern` matches (a name or a glob: one
  benchmark's runs on every machine, e.g. `unet_forward_*.jsonl`), by file name, then line."""
  out = []
  paths = sorted(glob.glob(os.path.join(RESULTS, pattern)))
  if not paths:
    raise SystemExit(f"benchmarks/results/{pattern}: no such results file")
  for path in paths:
    with open(path) as fh:
      for i, line in enumerate(fh, 1):
        if line.strip():
          try:
            out.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: line {i} is not a JSON record ({e})") from None
  return out


def num(x, sig: int = 4) -> str:
  """`x` to `sig` significant digits, trailing zeros dropped (14.10 -> 14.1); '-' for None."""
  if x is None:
    return "-"
  if abs(x) >= 10 ** sig:
    return f"{x:,.0f}"
  return f"{x:.{sig}g}"


def fixed(x, digits: int = 2, suffix: str = "") -> str:
  """`x` with `digits` decimals (the benchmark script's own print format); '-' for None."""
  return "-" if x is None else f"{x:.{digits}f}{suffix}"


def ratio(x) -> str:
  return "-" if x is None else f"{x:.3g}x"


def sci(x) -> str:
  """2e-06 -> 2e-6."""
  if x is None:
    return "-"
  mantissa, exp = f"{x:.1e}".split("e")
  mantissa = mantissa.rstrip("0").rstrip(".")
  return f"{mantissa}e{int(exp)}"


def table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def run_label(i: int, rec: dict) -> str:
  where = rec.get("cpu") if rec.get("device", "cpu").lower() == "cpu" else rec.get("device")
  return f"{i} ({where})" if where else str(i)


def runs(records: list[dict], extra=lambda rec: "") -> str:
  """One line per record: the run's date, processor, command, code, note and source."""
  lines = []
  for i, rec in enumerate(records, 1):
    device = rec.get("device", "")
    cores = f", {rec['cores']} cores" if rec.get("cores") else ""
    where = f"{rec.get('cpu', '?')}{cores}"
    if device and device.lower() != "cpu":
      where = f"{device} (host {where})"
    parts = [f"Run {i}: {rec.get('date', 'date unknown')}, {where}, `{rec['command']}`"]
    if rec.get("code"):
      parts.append(f"code: {rec['code']}")
    if rec.get("max_rel_diff") is not None:
      parts.append(f"largest output difference to diffusers {sci(rec['max_rel_diff'])} of scale")
    for text in (extra(rec), rec.get("note", "")):
      if text:
        parts.append(text)
    source = rec.get("source", "")
    if rec.get("commit"):
      source += f" (commit {rec['commit']})"
    lines.append("- " + "; ".join(parts) + f". Source: {source}.")
  return "\n".join(lines)


# ------------------------------------------------------------------ TPU compiles
# train_compile.py's records do not name the GroupNorm reduction; it changed at one commit
# (4f11049: XLA's reduction when lowered for TPU/GPU, pairwise sums on CPU only). Records
# compiled before it used the pairwise sums.
GROUPNORM_XLA_SINCE = "2026-11-28 14:59:08"
TRAIN_PROGRAMS = ("train", "train_r1", "g_step", "d_step", "d_step_r1")
PROGRAM_NAMES = {
    "train": "`train` (the whole step in one program)",
    "train_r1": "`train_r1` (the whole step with R1)",
    "d_step_r1": "`d_step_r1` (`d_step` with the R1 penalty, every 16th step)",
    "ddim_step": "`ddim_step` (the pairs stage: one DDIM step with CFG)",
    "ddim_scan": "`ddim_scan` (the whole 50-step sampler)",
}
MODEL_NAMES = {"sd15": "SD 1.5", "sdxl_base": "SDXL base"}


def compiles(name: str, model: str) -> list[dict]:
  """Every compiled program of `model` in results file `name`, in file order, each result
  dict with its record's context (`time`, `mesh`, `devices`, `chip`, `cpu`)."""
  out = []
  for rec in load(name):
    if rec.get("model") != model:
      continue
    for r in rec["results"]:
      out.append({**r, "time": rec["time"], "mesh": rec["mesh"], "devices": rec["devices"],
                  "chip": rec.get("chip") or {}, "cpu": rec.get("cpu", "")})
  return out


def settings(r: dict) -> dict:
  """attention, remat, microbatches and CFG from a result's note."""
  note = r.get("note", "")
  out = {"groupnorm": "pairwise" if r["time"] < GROUPNORM_XLA_SINCE else "XLA reduction"}
  for key in ("attention", "remat", "microbatches"):
    m = re.search(rf"{key}=(\w+)", note)
    if m:
      out[key] = m.group(1)
  return out


def is_sampler(r: dict) -> bool:
  return not r["program"].startswith(TRAIN_PROGRAMS)


def mesh_text(r: dict) -> str:
  if is_sampler(r):  # the samplers run on a data-only mesh of every device
    return f"data {r['devices']}"
  return " x ".join(f"{k} {v}" for k, v in r["mesh"].items())


def per_chip(r: dict) -> str:
  if is_sampler(r):
    return f"{r['per_chip_batch']} pairs ({2 * r['per_chip_batch']} UNet rows with CFG)"
  return str(r["per_chip_batch"])


def settings_text(r: dict) -> str:
  s = settings(r)
  parts = [s.get("attention", "?")]
  if not is_sampler(r):
    k = int(s.get("microbatches", 1))
    parts.append(f"{k} microbatches" if k > 1 else "no accumulation")
    parts.append("remat" if s.get("remat") == "True" else "no remat")
  parts.append(f"GroupNorm {s['groupnorm']}")
  return ", ".join(parts)


def memory_text(r: dict) -> str:
  if not r.get("fits") and "peak_bytes" not in r:
    m = re.search(r"temporaries \(([\d.]+)G\)", r.get("error", ""))
    return f"**does not fit**: {m.group(1)} GB of temporaries" if m else "**does not fit**"
  return f"{r['peak_bytes'] / 1e9:.1f} GB ({100 * r['hbm_fraction']:.0f}%)"


def seconds_text(s: float) -> str:
  return f"{1e3 * s:.1f} ms" if s < 1 else f"{s:.3g} s"


def estimate_text(r: dict) -> str:
  if r.get("est_seconds") is None:
    return "-"
  loops = r.get("loop_scale", 1.0) or 1.0
  return seconds_text(r["est_seconds"]) + (f" (loops x{loops:.0f})" if round(loops, 3) != 1
                                           else "")


def best(results: list[dict]) -> dict[str, dict]:
  """The last fitting result with an estimate of each program (`report.project_recipe`'s rule)."""
  return {r["program"]: r for r in results if r.get("fits") and r.get("est_seconds")}


def step_row(results: list[dict]) -> list[str] | None:
  """The train step as its two halves, D's update then G's: times add, memory is the larger."""
  b = best(results)
  if "d_step" not in b or "g_step" not in b:
    return None
  d, g = b["d_step"], b["g_step"]
  est = d["est_seconds"] + g["est_seconds"]
  flops = d["model_flops"] + g["model_flops"]
  peak = max((d, g), key=lambda r: r["peak_bytes"])
  mfu = flops / (est * g["chip"]["bf16_flops"])
  estimate = f"**{seconds_text(est)}**"
  if "d_step_r1" in b:
    estimate += f" ({seconds_text(b['d_step_r1']['est_seconds'] + g['est_seconds'])} with R1)"
  return ["**train step = `d_step` + `g_step`**", mesh_text(g), per_chip(g), settings_text(g),
          f"**{memory_text(peak)}**", estimate, f"**{100 * mfu:.1f}%**",
          f"{flops / 1e12:.1f}", "-"]


def compile_table(name: str, model: str) -> str:
  results = compiles(name, model)
  if not results:
    raise SystemExit(f"{name}: no record of {model}")
  chip = results[0]["chip"]
  cpu = results[0]["cpu"] or "this host"
  header = ["program", "mesh", "per chip", "settings",
            f"peak memory per chip (of {chip.get('hbm_bytes', 0) / 1e9:.0f} GB)",
            "compiler's estimated time per call", "MFU implied by the estimate",
            "model TFLOP per chip", f"compile time on {cpu}"]
  train = sorted((r for r in results if not is_sampler(r)), key=lambda r: r["time"])
  samplers = sorted((r for r in results if is_sampler(r)), key=lambda r: r["time"])
  rows = []
  for r in train + [None] + samplers:
    if r is None:
      total = step_row(results)
      if total:
        rows.append(total)
      continue
    fits = r.get("fits") or "peak_bytes" in r
    rows.append([PROGRAM_NAMES.get(r["program"], f"`{r['program']}`"), mesh_text(r),
                 per_chip(r), settings_text(r), memory_text(r), estimate_text(r),
                 f"{100 * r['mfu']:.1f}%" if fits and r.get("mfu") else "-",
                 f"{r['model_flops'] / 1e12:.1f}" if r.get("model_flops") else "-",
                 f"{r['compile_s']:.0f} s"])
  return table(header, rows)


def recipe_table(name: str) -> str:
  """`report.project_recipe` for each model of the file: the paper's recipe's wall time."""
  sys.path.insert(0, ROOT)
  from d2g_jax.aot.report import project_recipe
  models = []
  for rec in load(name):
    if rec["model"] not in models:
      models.append(rec["model"])
  header = ["model", "chips", "pairs: 3M at 50 DDIM steps with CFG (pairs per chip)",
            "training: 20k steps (estimated time per step)", "global batch", "total", "not included"]
  rows = []
  for model in models:
    results = compiles(name, model)
    n = results[0]["devices"]
    p = project_recipe([r for r in results if r["devices"] == n], n)
    b = best(results)
    hours = lambda key: f"{p[key] / 3600:.1f} h" if key in p else "-"
    pairs = hours("pairs_seconds")
    if "ddim_step" in b:
      pairs += f" ({b['ddim_step']['per_chip_batch']})"
    train = hours("train_seconds")
    if "d_step" in b and "g_step" in b:
      train += f" ({seconds_text(b['d_step']['est_seconds'] + b['g_step']['est_seconds'])})"
    elif "train" in b:
      train += f" ({seconds_text(b['train']['est_seconds'])})"
    notes = "; ".join(p["notes"]) or "-"
    rows.append([MODEL_NAMES.get(model, model), str(n), pairs, train,
                 str(p.get("global_batch", "-")), f"**{hours('total_seconds')}**", notes])
  return table(header, rows)


# ------------------------------------------------------------------ CPU benchmarks
def unet_forward_table(name: str) -> str:
  recs = load(name)
  rows = []
  for i, rec in enumerate(recs, 1):
    for r in rec["rows"]:
      base = r["implementation"].startswith("diffusers (PyTorch eager")
      rows.append([run_label(i, rec), r["batch"], f"`{r['implementation']}`", fixed(r["seconds"]),
                   "-" if base else fixed(r.get("vs_pytorch_eager"), suffix="x"),
                   sci(r.get("max_rel_diff"))])
  header = ["run", "batch", "implementation", "median seconds per forward",
            "speed vs PyTorch eager (> 1: faster)", "max rel. difference to diffusers"]
  extra = lambda rec: (f"{rec['preset']}, {rec['latent_size']}x{rec['latent_size']}x4 latents, "
                       f"{rec['dtype']}, median of {rec['repeats']}")
  return table(header, rows) + "\n\n" + runs(recs, extra)


def pairs_table(name: str) -> str:
  recs = load(name)
  rows = []
  for i, rec in enumerate(recs, 1):
    for r in rec["rows"]:
      rows.append([run_label(i, rec), r["batch"], f"`{r['implementation']}`",
                   f"{fixed(r['seconds'])} ({rec['steps']} steps)",
                   fixed(r.get("pairs_per_s_at_50"), 4), fixed(r.get("speedup"), suffix="x"),
                   sci(r.get("max_rel_diff"))])
  header = ["run", "batch (pairs per call)", "implementation", "median seconds per call",
            "pairs/s at 50 steps", "speed-up vs diffusers", "max rel. difference to diffusers"]
  extra = lambda rec: (f"{rec.get('model', 'sd15')}, {rec['dtype']}, CFG "
                       f"{num(rec['guidance_scale'])}, median of {rec['repeats']}")
  return table(header, rows) + "\n\n" + runs(recs, extra)


def one_step_table(name: str) -> str:
  recs = [rec for rec in load(name) if "student" not in rec]  # random weights, full size
  rows = []
  for i, rec in enumerate(recs, 1):
    k = rec["teacher_steps"]
    for r in rec["rows"]:
      s, lat, img = r["seconds"], r["latents"], r["images"]
      rows.append([run_label(i, rec), r["batch"], num(s["student"]), num(s["teacher"]),
                   num(r["teacher_50_step_s"]), num(s["decode"]),
                   f"{num(lat['student_img_per_s'], 3)} vs {num(lat['teacher_img_per_s'], 3)}",
                   f"**{ratio(lat['speedup'])}**",
                   f"{num(img['student_s_per_image'])} vs {num(img['teacher_s_per_image'])}",
                   f"**{ratio(img['speedup'])}**"])
    header = ["run", "batch", "student: text encoder + 1 UNet call (s)",
              f"teacher: {k} DDIM steps with CFG (s)", "teacher scaled to 50 steps (s)",
              "VAE decode (s)", "latents/s, student vs teacher", "one step's speed-up (latents)",
              "s per decoded image, student vs teacher", "one step's speed-up (images)"]
  extra = lambda rec: (f"{rec.get('model', 'sd15')}, {rec['dtype']}, teacher timed at "
                       f"{rec['teacher_steps']} steps, median of {rec['repeats']}")
  return table(header, rows) + "\n\n" + runs(recs, extra)


def one_step_trained_table(name: str) -> str:
  """`one_step.py --model --teacher`: trained folders through the sampling API, end to end."""
  recs = [rec for rec in load(name) if "student" in rec]
  rows = []
  for i, rec in enumerate(recs, 1):
    for r in rec["rows"]:
      rows.append([run_label(i, rec), r["batch"], num(r["seconds"]["student"], 3),
                   num(r["seconds"]["teacher"], 3),
                   f"{num(r['student_img_per_s'], 4)} vs {num(r['teacher_img_per_s'], 4)}",
                   f"**{ratio(r['speedup'])}**"])
  k = recs[0]["teacher_steps"] if recs else 50
  header = ["run", "batch", "student, 1 step (s per call)",
            f"teacher, {k} DDIM steps with CFG (s per call)",
            "images/s, student vs teacher", "student's speed-up"]
  extra = lambda rec: (f"{rec['model']}, {rec['image_size'][0]}x{rec['image_size'][1]} images, "
                       f"{rec['dtype']}, CFG {num(rec['guidance_scale'])}, prompt "
                       f"\"{rec['prompt']}\", median of {rec['repeats']}")
  return table(header, rows) + "\n\n" + runs(recs, extra)


def perceptual_cost_table(name: str) -> str:
  recs = load(name)
  rows = []
  for i, rec in enumerate(recs, 1):
    e = rec["results"].get("e_latent_lpips", {})
    p = rec["results"].get("lpips", {})
    q = rec.get("ratios", {})
    pair = lambda key, fmt=num: (f"{fmt(e.get(key))} / {fmt(p.get(key))}" if p
                                 else fmt(e.get(key)))
    rows.append([run_label(i, rec), rec.get("code", "-"), pair("seconds"), ratio(q.get("time")),
                 pair("xla_memory_gb"), ratio(q.get("xla_memory")), ratio(q.get("activations")),
                 pair("peak_rss_gb"), ratio(q.get("peak_rss"))])
  header = ["run", "code", "seconds per call: E-LatentLPIPS / pixel LPIPS", "time ratio",
            "XLA memory, GB (args + out + temp)", "memory ratio", "activations ratio",
            "peak RSS, GB", "peak RSS ratio"]
  extra = lambda rec: (f"batch {rec['batch']}, {rec['latent_size']}x{rec['latent_size']}x4 "
                       f"latents, {rec['dtype']}, augmentation `{rec['augment']}`, median of "
                       f"{rec['repeats']}")
  return table(header, rows) + "\n\n" + runs(recs, extra)


LOSS_NAMES = {"e_latent_lpips": "E-LatentLPIPS", "lpips": "pixel LPIPS through the VAE decoder"}


def train_step_table(name: str) -> str:
  recs = load(name)
  rows = []
  for i, rec in enumerate(recs, 1):
    for step, r in rec["steps"].items():
      loss, _, r1 = step.partition("+")
      label = LOSS_NAMES.get(loss, loss) + (" (with R1)" if r1 else "")
      rows.append([run_label(i, rec), label, fixed(r["seconds"]), fixed(r["tflop"]),
                   fixed(r["temp_gb"])])
  header = ["run", "regression loss of the step", "median seconds per step",
            "TFLOP per step (XLA)", "XLA temporaries, GB"]
  extra = lambda rec: (f"{rec['preset']}, {rec['latent_size']}x{rec['latent_size']}x4 latents, "
                       f"batch {rec['batch']}, {rec['dtype']}, optimizer {rec['optimizer']}, "
                       f"median of {rec['repeats']}")
  return table(header, rows) + "\n\n" + runs(recs, extra)


def convert_memory_table(name: str) -> str:
  recs = load(name)
  rows = []
  for i, rec in enumerate(recs, 1):
    for r in rec["rows"]:
      rows.append([run_label(i, rec), r["direction"], fixed(r["peak_rss_gib"]),
                   f"{fixed(r['ratio'], suffix='x')} of {fixed(rec['weights_gib'])} GiB"])
  header = ["run", "conversion", "peak resident memory, GiB", "x the fp32 weights"]
  extra = lambda rec: f"{rec['preset']} UNet, random weights"
  return table(header, rows) + "\n\n" + runs(recs, extra)


LATENT_VGG_STEPS = {
    "encode 256 px": "`latent_cache`: SD VAE encoder, 256 px image -> 32x32x4",
    "encode BAPPS": "`latent_cache`: one BAPPS triplet, 3 x 64 px",
    "train step": "`latent_vgg_train`: one image, fwd + bwd + SGD, 32x32x4, torchvision head, "
                  "1000 classes",
    "features": "`latent_vgg_calibrate`: trunk features of one triplet (3 x 8x8x4)",
}


def latent_vgg_table(name: str) -> str:
  recs = load(name)
  rows = []
  for i, rec in enumerate(recs, 1):
    for step, r in rec["rows"].items():
      rows.append([run_label(i, rec), LATENT_VGG_STEPS.get(step, step),
                   num(r["ours_s_per_image"], 3), num(r["torch_s_per_image"], 3),
                   ratio(r["speedup"])])
  header = ["run", "step", "ours, s per image", "PyTorch, s per image", "speed-up"]
  extra = lambda rec: f"batch {rec['batch']}, fp32, random weights, median of {rec['repeats']}"
  return table(header, rows) + "\n\n" + runs(recs, extra)


def gdd_i_table(name: str) -> str:
  """GDD-I's generator half compiled before and after frozen parameters left out of the
  gradient (each record's `label` says which code compiled it)."""
  rows = []
  for rec in load(name):
    for r in rec["results"]:
      fits = r.get("fits") or "peak_bytes" in r
      rows.append([rec.get("label", "?"), f"`{r['program']}`", mesh_text({**r, **rec}),
                   per_chip(r), f"{r['temp_bytes'] / 1e9:.1f} GB" if fits else "-",
                   memory_text(r), f"{r['hlo_flops'] / 1e12:.1f}" if r.get("hlo_flops") else "-",
                   estimate_text(r), f"{100 * r['mfu']:.1f}%" if fits and r.get("mfu") else "-"])
  chip = load(name)[0]["chip"] if rows else {}
  return table(["code", "program", "mesh", "per chip", "temporaries per chip",
                f"peak memory per chip (of {chip.get('hbm_bytes', 0) / 1e9:.0f} GB)",
                "HLO TFLOP per chip", "compiler's estimated time per call",
                "MFU implied by the estimate"], rows)


def many_hosts_table(name: str) -> str:
  """Each stage's wall time per process layout (`benchmarks/many_hosts.py`)."""
  recs = load(name)
  rows = []
  order = ("pairs", "real_latents", "latent_cache", "latent_vgg_train", "latent_vgg_calibrate",
           "train", "export", "eval")  # the order the stages run in
  for i, rec in enumerate(recs, 1):
    base, other = rec["layouts"][0], rec["layouts"][1:]
    stages = sorted(rec["seconds"][base], key=lambda x: (order.index(x) if x in order else 99, x))
    for stage in stages:
      t = rec["seconds"][base][stage]
      times = [rec["seconds"][layout][stage] for layout in other]
      rows.append([run_label(i, rec), f"`{stage}`", num(t, 3), *[num(x, 3) for x in times],
                   *[ratio(x / t) for x in times]])
  layouts = recs[0]["layouts"]
  header = ["run", "stage", f"{layouts[0]}, s", *[f"{x}, s" for x in layouts[1:]],
            *[f"{x} / {layouts[0]}" for x in layouts[1:]]]
  extra = lambda rec: (f"config tests/multihost_config.py{':' + rec['variant'] if rec['variant'] else ''}; "
                       "process 0's wall time per stage, compiling included")
  return table(header, rows) + "\n\n" + runs(recs, extra)


TABLES = {  # name: (make the markdown, the results files it reads)
    "many_hosts": (lambda: many_hosts_table("many_hosts_*.jsonl"), "many_hosts_*.jsonl"),
    "v5p_gdd_i": (lambda: gdd_i_table("train_compile_gdd_i_v5p.jsonl"),
                  "train_compile_gdd_i_v5p.jsonl"),
    "v5p_sd15": (lambda: compile_table("train_compile_v5p.jsonl", "sd15"),
                 "train_compile_v5p.jsonl"),
    "v5p_sdxl": (lambda: compile_table("train_compile_v5p.jsonl", "sdxl_base"),
                 "train_compile_v5p.jsonl"),
    "v5p_recipe": (lambda: recipe_table("train_compile_v5p.jsonl"), "train_compile_v5p.jsonl"),
    "unet_forward": (lambda: unet_forward_table("unet_forward_*.jsonl"), "unet_forward_*.jsonl"),
    "pairs": (lambda: pairs_table("pairs_*.jsonl"), "pairs_*.jsonl"),
    "one_step": (lambda: one_step_table("one_step_*.jsonl"), "one_step_*.jsonl"),
    "one_step_trained": (lambda: one_step_trained_table("one_step_*.jsonl"), "one_step_*.jsonl"),
    "perceptual_cost": (lambda: perceptual_cost_table("perceptual_cost_*.jsonl"),
                        "perceptual_cost_*.jsonl"),
    "train_step": (lambda: train_step_table("train_step_*.jsonl"), "train_step_*.jsonl"),
    "convert_memory": (lambda: convert_memory_table("convert_memory_*.jsonl"),
                       "convert_memory_*.jsonl"),
    "latent_vgg": (lambda: latent_vgg_table("latent_vgg_*.jsonl"), "latent_vgg_*.jsonl"),
}


# ------------------------------------------------------------------ the pages
def pages() -> list[str]:
  return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def render(text: str, path: str, cache: dict) -> tuple[str, list[str]]:
  """`text` with every marked table regenerated, and the names of those that changed."""
  opened = OPEN.findall(text)
  closed = CLOSE.findall(text)
  if sorted(opened) != sorted(closed) or len(MARKER.findall(text)) != len(opened):
    raise SystemExit(f"{os.path.relpath(path, ROOT)}: unbalanced table markers "
                     f"(opened {opened}, closed {closed})")
  changed = []

  def sub(m):
    name = m.group(1)
    if name not in TABLES:
      raise SystemExit(f"{os.path.relpath(path, ROOT)}: unknown table {name!r}; "
                       f"known: {sorted(TABLES)}")
    if name not in cache:
      cache[name] = TABLES[name][0]()
    body = "\n" + cache[name] + "\n\n"
    if m.group(2) != body:
      changed.append(name)
    return f"<!-- table:{name} -->\n{body}<!-- /table:{name} -->"
  return MARKER.sub(sub, text), changed


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--check", action="store_true",
                 help="change nothing; exit 1 naming the tables the results would change")
  p.add_argument("--list", action="store_true", help="the tables and their results files")
  args = p.parse_args(argv)
  if args.list:
    for name, (_, source) in TABLES.items():
      print(f"{name:18s} benchmarks/results/{source}")
    return 0
  cache, stale, used = {}, [], set()
  for path in pages():
    with open(path) as fh:
      text = fh.read()
    new, changed = render(text, path, cache)
    used.update(OPEN.findall(text))
    rel = os.path.relpath(path, ROOT)
    stale += [f"{rel}: {name}" for name in changed]
    if changed and not args.check:
      with open(path, "w") as fh:
        fh.write(new)
      print(f"{rel}: rewrote {', '.join(changed)}")
  unused = sorted(set(TABLES) - used)
  if unused:
    print(f"note: tables in no page: {', '.join(unused)}")
  if args.check:
    if stale:
      print("stale tables (run python benchmarks/tables.py):\n  " + "\n  ".join(stale))
      return 1
    print(f"{len(used)} tables up to date")
  return 0


if __name__ == "__main__":
  sys.exit(main())
