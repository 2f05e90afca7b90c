"""The package's layers: a module imports only from its own layer and the ones below.

LAYERS is the one place the order is written (docs/architecture.md shows it). Every import
is read from the source, those inside functions included, so a deferred import cannot hide
an upward dependency. When this fails: move the helper that both modules need down to the
layer they share (a helper used by two stages lives below both), never import upwards.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "d2g_jax"

# Lowest first. A name is a module or a package (all of its modules) under d2g_jax.
LAYERS = (
    ("_xla_flags", "files", "log", "parallel", "lock", "dtypes", "grid", "distributed"),
    ("models", "sampling"),
    ("convert", "teacher", "tiny"),
    ("data", "losses"),
    ("infra", "student"),
    ("train", "latent_lpips"),
    ("evaluate", "aot", "sample"),
    ("demo",),
    ("config_defaults", "run", "main", "preflight", "app"),
)


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, absolute module name) of every d2g_jax import in the file, at any depth."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      # `from d2g_jax.x import y` may import the module d2g_jax.x.y
      for alias in node.names:
        sub = f"{module}.{alias.name}"
        is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or \
            (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists()
        found.append((node.lineno, sub if is_module else module))
  return [(line, m) for line, m in found if m == "d2g_jax" or m.startswith("d2g_jax.")]


def layer_of(module: str) -> int | None:
  """The layer of d2g_jax.<top>...; None for the package itself."""
  parts = module.split(".")
  if len(parts) < 2:
    return None
  for i, names in enumerate(LAYERS):
    if parts[1] in names:
      return i
  raise KeyError(f"{module}: d2g_jax.{parts[1]} is in no layer; add it to LAYERS in "
                 f"{__file__} (and docs/architecture.md)")


def modules() -> list[pathlib.Path]:
  return sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_name_has_a_layer():
  tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in modules()}
  tops.discard("__init__")
  listed = {n for names in LAYERS for n in names}
  assert tops <= listed, f"not in LAYERS: {sorted(tops - listed)}"
  assert not listed - tops, f"in LAYERS but not in the package: {sorted(listed - tops)}"


def test_no_upward_import():
  bad = []
  for path in modules():
    here = layer_of(_module_name(path))
    for line, target in _imports(path):
      there = layer_of(target)
      if here is not None and there is not None and there > here:
        bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} "
                   f"(layer {there} {LAYERS[there]} above layer {here} {LAYERS[here]})")
  assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path):
  source = "def f():\n  from d2g_jax.train import loop\n  import d2g_jax.run\n"
  path = PACKAGE / "models" / "_probe_for_test.py"
  try:
    path.write_text(source)
    found = {m for _, m in _imports(path)}
  finally:
    path.unlink()
  assert found == {"d2g_jax.train.loop", "d2g_jax.run"}
  assert layer_of("d2g_jax.train.loop") > layer_of("d2g_jax.models.unet")


@pytest.mark.parametrize("module", ["d2g_jax.models.unet", "d2g_jax.train.loop", "d2g_jax.run"])
def test_layer_lookup(module):
  assert layer_of(module) is not None
