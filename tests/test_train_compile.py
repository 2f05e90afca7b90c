"""Ahead-of-time compile reports (d2g_jax/aot, benchmarks/train_compile.py).

CPU counterparts run by default: the train step and the sampler compiled for 8 fake CPU
devices, FLOP counting, collective counting, the batch search. The TPU compiles (libtpu,
the optional `tpu` extra) are skipped without it.
"""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from d2g_jax import config_defaults, parallel
from d2g_jax.aot import programs, report, target
from d2g_jax.models.attention import attention

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason=f"libtpu not installed: {target.TPU_EXTRA}")
FAKE_CHIP = target.Chip("fake", hbm_bytes=1e9, bf16_flops=100e12, hbm_bytes_per_s=1e12,
                        source="test")


def tiny_config(attention_impl="xla"):
  """Tiny and quick to compile: regression only (gan_weight 0: no discriminator update)."""
  config = config_defaults.base()
  config.loss.name = "mse"
  config.objective.gan_weight = 0.0
  config.train.dtype = "float32"  # compiles twice as fast on CPU as bfloat16
  config.train.attention = attention_impl
  config.teacher.attention = attention_impl
  config.pairs.num_steps = 2
  config.sharding.min_size = 256
  return config


def test_matmul_flops_counts_dots_convs_scans_shard_maps_and_gradients():
  a, b = jnp.zeros((4, 8)), jnp.zeros((8, 16))
  count = lambda f, *args: report.matmul_flops(jax.make_jaxpr(f)(*args))
  assert count(jnp.matmul, a, b) == 2 * 4 * 8 * 16
  x, k = jnp.zeros((2, 10, 10, 3)), jnp.zeros((3, 3, 3, 5))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert count(conv, x, k) == 2 * (2 * 10 * 10 * 5) * 3 * 9
  # forward + both input gradients: three matmuls of the same size
  assert count(jax.grad(lambda a, b: jnp.sum(a @ b), argnums=(0, 1)), a, b) == 3 * 2 * 4 * 8 * 16
  scan = lambda a: jax.lax.scan(lambda c, _: (c @ jnp.eye(8), None), a, length=5)[0]
  assert count(scan, a) == 5 * 2 * 4 * 8 * 8
  assert report.matmul_flops(jax.make_jaxpr(scan)(a), loops=False) == 2 * 4 * 8 * 8
  mesh = parallel.make_mesh({"data": 8})
  spec = jax.sharding.PartitionSpec("data")
  sharded = jax.shard_map(lambda a: a @ b, mesh=mesh, in_specs=spec, out_specs=spec)
  assert count(sharded, jnp.zeros((16, 8))) == 2 * 16 * 8 * 16  # global, not per device


def test_flash_kernels_are_found_and_their_missing_costs_added():
  """The backward kernels of JAX's flash attention declare no cost; report.kernel_seconds
  adds their matmul FLOPs at the chip's peak times the MXU fill of the head width."""
  q = jnp.zeros((2, 256, 2, 40), jnp.bfloat16)
  f = lambda q, k, v: jnp.sum(attention(q, k, v, implementation="flash").astype(jnp.float32))
  kernels = report.pallas_kernels(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, q, q))
  unit = 2 * 2 * 256 * 256 * 40  # b n t s k
  by_name = {k["kernel"]: k for k in kernels}
  assert by_name["_flash_attention_kernel"]["costed"] and \
      by_name["_flash_attention_kernel"]["flops"] == 4 * unit
  assert not by_name["_flash_attention_dkv_kernel"]["costed"]
  assert by_name["_flash_attention_dkv_kernel"]["flops"] == 8 * unit
  assert by_name["_flash_attention_dq_kernel"]["flops"] == 6 * unit
  fill = 40 / 128
  want = (4 * unit / fill - 4 * unit + 14 * unit / fill) / FAKE_CHIP.bf16_flops
  assert report.kernel_seconds(kernels, FAKE_CHIP) == pytest.approx(want)


def test_collectives_are_counted_with_their_bytes():
  hlo = """
  %all-gather-start.1 = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[4,8]{1,0} %p), dimensions={0}
  %all-gather-done.1 = f32[16,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[16,8]{1,0}) %all-gather-start.1)
  %reduce-scatter.2 = bf16[4,8]{1,0} reduce-scatter(bf16[16,8]{1,0} %x), dimensions={0}
  ROOT %all-reduce.3 = f32[] all-reduce(f32[] %y), to_apply=%add
  """
  assert report.collectives(hlo) == {
      "all-gather": {"count": 1, "bytes": (4 * 8 + 16 * 8) * 4 // 2},
      "reduce-scatter": {"count": 1, "bytes": 4 * 8 * 2},
      "all-reduce": {"count": 1, "bytes": 4}}


@pytest.mark.parametrize("per_row,fixed,want", [(10, 100, 90), (10, 900, 10), (10, 995, None),
                                                (1, 1, 256)])
def test_largest_fitting_batch_with_few_compiles(per_row, fixed, want):
  calls = []

  def fake(b):
    calls.append(b)
    peak = fixed + per_row * b
    return {"fits": peak <= 1000, "peak_bytes": peak} if peak <= 1000 else {"fits": False}
  best, reports = report.largest_fitting(fake, 16, 1000, limit=256)
  assert best == want
  assert len(calls) == len(set(calls)) == len(reports) <= 9
  assert all(r["fits"] == ("peak_bytes" in r) for r in reports)


def test_mesh_falls_back_to_split_physical_axes(monkeypatch):
  """jax.make_mesh refuses a mesh whose axes do not factor the TPU torus (fsdp 8 on
  v5p 4x4x4); make_mesh then splits physical axes instead of failing."""
  def refuse(*a, **k):
    raise NotImplementedError("Failed to find assignment for logical_axis_index 1")
  monkeypatch.setattr(jax, "make_mesh", refuse)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2


def test_train_step_and_sampler_programs_for_cpu_devices(tmp_path):
  """The CPU counterpart of the TPU compiles: the tiny SD 1.5 train step (FSDP over 4,
  data 2) built from abstract inputs and lowered with its shardings and donation, and
  one DDIM+CFG step compiled, with the report's fields."""
  devices = target.devices("cpu:8")
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4}, devices)
  model = programs.MODELS["tiny_sd15"]
  train, = programs.train_programs(tiny_config(), model, mesh, 1, platform="cpu",
                                   variants=["train"])
  state, consts, batch = train.args
  assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(train.args))
  assert state.g_params["conv_in"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
      None, None, None, "fsdp")
  assert batch["z"].shape == (8, 16, 16, 4) and batch["prompt_embeds"].dtype == jnp.float16
  lowered = train.fn.trace(*train.args).lower().as_text()
  assert "tf.aliasing_output" in lowered  # the state is donated
  model_flops = report.matmul_flops(jax.make_jaxpr(train.reference)(*train.reference_args))
  assert model_flops > 0
  # Gradient accumulation: the same work, in a scan over the microbatches.
  config = tiny_config()
  config.train.microbatches = 2
  accum, = programs.train_programs(config, model, mesh, 2, platform="cpu", variants=["train"])
  jaxpr = jax.make_jaxpr(accum.reference)(*accum.reference_args)
  assert report.matmul_flops(jaxpr) == pytest.approx(2 * model_flops)  # batch 2 per chip
  assert report.matmul_flops(jaxpr, loops=False) == pytest.approx(model_flops)
  with pytest.raises(ValueError, match="do not split into train.microbatches=2"):
    programs.train_programs(config, model, mesh, 1, platform="cpu", variants=["train"])
  step, scan = programs.sampler_programs(tiny_config(), model,
                                         parallel.make_mesh({"data": 8}, devices), 2,
                                         platform="cpu")
  r = report.compile_report(step, None, 8)
  assert r["program"] == "ddim_step" and r["per_chip_batch"] == 2 and r["fits"]
  assert r["peak_bytes"] >= r["argument_bytes"] > 0 and r["hlo_flops"] > 0
  # one step with CFG: the UNet forward on 2 x 16 rows, a share per chip
  assert r["model_flops"] == pytest.approx(report.matmul_flops(jax.make_jaxpr(
      step.reference)(*step.args)) / 8)
  assert 0.5 < r["model_flops"] / r["hlo_flops"] < 1.5
  assert "all-gather" not in r["collectives"]  # the batch stays where it is
  assert r["kernels"] == {} and "mfu" not in r  # no chip model on CPU
  # The 2-step scan: XLA's cost analysis counts the loop body once; the report scales it.
  r2 = report.compile_report(scan, None, 8, hlo_dir=str(tmp_path))
  assert r2["loop_scale"] == pytest.approx(2.0) and r["loop_scale"] == 1.0
  assert r2["hlo_flops"] == pytest.approx(2 * r["hlo_flops"], rel=0.05)
  assert "ENTRY" in open(tmp_path / "ddim_scan_b2.hlo.txt").read()


def _cli():
  spec = importlib.util.spec_from_file_location(
      "train_compile", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                    "train_compile.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  return cli


def test_command_line_writes_a_json_record(tmp_path, monkeypatch):
  cli = _cli()
  out = tmp_path / "r.jsonl"
  cli.main(["--config", os.path.join(os.path.dirname(__file__), "tiny_train_config.py"),
            "--model", "tiny_sd15", "--topology", "cpu:8", "--programs", "ddim_step",
            "--per_chip_batch", "1", "--set", "pairs.num_steps=2", "--set",
            "teacher.attention=xla", "--json", str(out)])
  record = json.loads(out.read_text())
  assert record["devices"] == 8 and record["results"][0]["program"] == "ddim_step"
  with pytest.raises(SystemExit, match="unknown"):
    cli.main(["--topology", "cpu:8", "--programs", "nope", "--model", "tiny_sd15"])


@needs_libtpu
def test_flash_attention_compiles_for_a_tpu_topology():
  """Mosaic compiles the three flash kernels for TPU v5p inside a step sharded over 4
  chips (the full train step: benchmarks/train_compile.py, minutes); the report has the
  compiler's time and memory, and the backward kernels' cost added."""
  devices = target.devices("v5p:2x2x1")
  assert len(devices) == 4 and target.chip("v5p:2x2x1").bf16_flops == 459e12
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4}, devices)
  sh = parallel.batch_sharding(mesh)
  qkv = (jax.ShapeDtypeStruct((8, 1024, 8, 40), jnp.bfloat16, sharding=sh),) * 3

  def step(impl):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, implementation=impl).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))
  fn = jax.jit(parallel.under_mesh(step("flash"), mesh))
  prog = programs.Program("attention", fn, qkv, 2, step("xla"), qkv)
  # conftest's "highest" would ask Mosaic for fp32-precision matmuls of bf16 operands
  with jax.default_matmul_precision("default"):
    r = report.compile_report(prog, target.chip("v5p:2x2x1"), 4)
  assert r["kernels"] == {"_flash_attention_kernel": 1, "_flash_attention_dkv_kernel (no cost)": 1,
                          "_flash_attention_dq_kernel (no cost)": 1}
  unit = 2 * 8 * 1024 * 1024 * 40  # per chip: b n t s k
  assert r["model_flops"] == pytest.approx(12 * unit)  # forward 4, backward 8 (XLA's)
  fn_xla = jax.jit(step("xla"))
  ref = report.compile_report(programs.Program("xla", fn_xla, qkv, 2, step("xla"), qkv),
                              target.chip("v5p:2x2x1"), 4)
  assert r["fits"] and r["temp_bytes"] < ref["temp_bytes"] / 3  # no T x S scores in HBM
  assert r["kernel_seconds"] > 0 and r["est_seconds"] > r["optimal_seconds"] > 0
  assert 0 < r["mfu"] < 1


HAVE_CUDA_PLUGIN = any(importlib.util.find_spec(p) is not None
                       for p in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


@pytest.mark.skipif(not HAVE_CUDA_PLUGIN, reason=f"JAX's CUDA plugin not installed: "
                    f"{target.GPU_EXTRA}")
def test_attention_compiles_for_h100s_without_a_gpu():
  """A compile-only H100 topology from the plugin and a device description: XLA's and
  cuDNN's attention compile, memory is reported (XLA's GPU compiler gives no time)."""
  devices = target.devices("h100:2x4")
  assert len(devices) == 8 and devices[-1].process_index == 1
  mesh = parallel.make_mesh({"data": 8}, devices)
  q = (jax.ShapeDtypeStruct((16, 1024, 8, 64), jnp.bfloat16,
                            sharding=parallel.batch_sharding(mesh)),) * 3
  temps = {}
  for impl in ("xla", "cudnn"):
    step = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, implementation=impl)
                                            .astype(jnp.float32)), argnums=(0, 1, 2))
    r = report.compile_report(programs.Program(impl, jax.jit(step), q, 2, step, q),
                              target.chip("h100:8"), 8)
    assert r["fits"] and "est_seconds" not in r
    temps[impl] = r["temp_bytes"]
  assert temps["cudnn"] < temps["xla"] / 4


def test_recipe_projection_from_estimates(tmp_path, capsys):
  """3M pairs at 50 steps and 20k train steps (R1 every 16th) from the per-call estimates."""
  results = [{"program": "ddim_step", "per_chip_batch": 16, "fits": True, "est_seconds": 0.1},
             {"program": "train", "per_chip_batch": 16, "fits": True, "est_seconds": 1.0},
             {"program": "train", "per_chip_batch": 32, "fits": False},
             {"program": "train_r1", "per_chip_batch": 16, "fits": True, "est_seconds": 2.6}]
  p = report.project_recipe(results, 64)
  assert p["pairs_seconds"] == pytest.approx(math.ceil(3e6 / (64 * 16)) * 50 * 0.1)
  assert p["train_seconds"] == pytest.approx(20000 * (15 / 16 * 1.0 + 2.6 / 16))
  assert p["global_batch"] == 1024 and p["notes"] == []
  assert p["total_seconds"] == pytest.approx(p["pairs_seconds"] + p["train_seconds"])
  halves = [results[0], {"program": "d_step", "per_chip_batch": 16, "fits": True,
                         "est_seconds": 0.4},
            {"program": "g_step", "per_chip_batch": 16, "fits": True, "est_seconds": 0.6},
            {"program": "d_step_r1", "per_chip_batch": 16, "fits": True, "est_seconds": 2.0}]
  assert report.project_recipe(halves, 64)["train_seconds"] == pytest.approx(p["train_seconds"])
  p = report.project_recipe(results[1:2], 64)
  assert "pairs_seconds" not in p and "total_seconds" not in p and len(p["notes"]) == 2
  # from the command line, over --json records of the same model and chip count
  runs = tmp_path / "runs.jsonl"
  runs.write_text(json.dumps({"model": "tiny_sd15", "devices": 8, "results": results}) + "\n")
  cli = _cli()
  cli.main(["--model", "tiny_sd15", "--topology", "cpu:8", "--project", str(runs)])
  assert "total" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="no record of tiny_sd15 on 4 chips"):
    cli.main(["--model", "tiny_sd15", "--topology", "cpu:4", "--project", str(runs)])
  with pytest.raises(SystemExit, match="no such file"):
    cli.main(["--model", "tiny_sd15", "--topology", "cpu:8", "--project", str(tmp_path / "x")])
  runs.write_text(runs.read_text() + '{"model": "tiny_sd15", "dev\n')
  with pytest.raises(SystemExit, match="line 2 is not a JSON record"):
    cli.main(["--model", "tiny_sd15", "--topology", "cpu:8", "--project", str(runs)])
