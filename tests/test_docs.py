"""The docs stay true: README.md a front page linking every page of docs/, every relative link
and #anchor resolving, the tables of numbers the recorded results (benchmarks/tables.py
--check), the quickstart holding CI's exact test command, and every module, file and test
named in backticks existing. Reads files and imports a few modules; compiles nothing."""

from __future__ import annotations

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.glob("*.md"))
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`([^`]+)`")
# d2g_jax/x/y.py (+ :name or ::name), d2g_jax/x/ (a folder), d2g_jax.x.y(.attr...)
MODULE_PATH = re.compile(r"(?<![\w/.])d2g_jax((?:/[\w.-]+)+/?)(?:::?(\w+))?")
DOTTED = re.compile(r"(?<![\w/.])d2g_jax((?:\.[A-Za-z_]\w*)+)")
# the repository's other files: tests/x.py(::name), configs/x.py(:arg), benchmarks/..., ...
REPO_PATH = re.compile(r"(?<![\w/.])((?:tests|benchmarks|configs|scripts|launch|docs|\.ci)"
                       r"/[\w./-]*[\w/])(?:(::?)(\w+))?")
STATUS = re.compile(r"\bissues? \d+|\(issue|no GPU (?:was )?lent|not yet recorded|"
                    r"\bdone \(|\bpartial \(", re.I)


def prose(text: str) -> str:
  """`text` without its fenced code blocks (their lines blanked, so line numbers hold)."""
  out, fenced = [], False
  for line in text.splitlines():
    if FENCE.match(line):
      fenced = not fenced
      out.append("")
    else:
      out.append("" if fenced else line)
  return "\n".join(out)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: its text lower-cased, punctuation dropped (word
  characters, hyphens and spaces kept), spaces to hyphens."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
  text = re.sub(r"[^\w\- ]", "", text.strip().lower())
  return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
  seen: dict[str, int] = {}
  out = set()
  for line in prose(page.read_text()).splitlines():
    m = HEADING.match(line)
    if m:
      base = slug(m.group(2))
      n = seen.get(base, 0)
      seen[base] = n + 1
      out.add(base if n == 0 else f"{base}-{n}")
  return out


def links(page: pathlib.Path) -> list[str]:
  text = CODE_SPAN.sub("", prose(page.read_text()))
  return LINK.findall(text)


def code_spans(page: pathlib.Path) -> list[str]:
  return CODE_SPAN.findall(prose(page.read_text()))


def rel(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


# ------------------------------------------------------------------ the front page
def test_readme_is_a_front_page():
  n = len(README.read_text().splitlines())
  assert n <= MAX_README_LINES, (
      f"README.md has {n} lines (at most {MAX_README_LINES}): move the detail to a page of docs/ "
      "and link it from the README's Manual")


def test_readme_links_every_docs_page():
  linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README)
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")}
  missing = [rel(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
  assert not missing, f"README.md links none of {missing}; add them to its Manual list"


def ci_test_command() -> str:
  lines = (ROOT / ".ci" / "run").read_text().splitlines()
  marker = next(i for i, line in enumerate(lines) if "quickstart test command" in line)
  return next(line.strip() for line in lines[marker + 1:] if line.strip())


def test_quickstart_holds_the_ci_test_command():
  command = ci_test_command()
  text = README.read_text()
  quickstart = text[text.index("## Quickstart"):]
  quickstart = quickstart[:quickstart.index("\n## ", 1)] if "\n## " in quickstart[1:] else quickstart
  blocks = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
  assert any(command in block.splitlines() for block in blocks), (
      f"the README's quickstart lacks .ci/run's test command, verbatim: {command!r}")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_status_remarks(page):
  hits = [line for line in page.read_text().splitlines() if STATUS.search(line)]
  assert not hits, f"{rel(page)}: status remarks or issue numbers: {hits}"


# ------------------------------------------------------------------ links and anchors
@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
  broken = []
  for target in links(page):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
      broken.append(f"{target}: no such file")
    elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
      broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
  assert not broken, f"{rel(page)}: " + "; ".join(broken)


# ------------------------------------------------------------------ the tables
def test_tables_are_the_recorded_results():
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT)
  assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------ names in the docs
def named(pattern: re.Pattern) -> list[tuple[str, str]]:
  """(page, match) for every match of `pattern` inside the pages' code spans, less the
  templates (`benchmarks/results/<name>_<machine>.jsonl`, `*.jsonl`, `{workdir}`)."""
  out = []
  for page in PAGES:
    for span in code_spans(page):
      out += [(rel(page), m.group(0)) for m in pattern.finditer(span)
              if span[m.end():m.end() + 1] not in ("<", "*", "{")]
  return sorted(set(out))


def resolve_module_path(name: str) -> str | None:
  """None when d2g_jax/x/y.py (or a folder, or y.py:attr) exists, else why not."""
  m = MODULE_PATH.fullmatch(name)
  path, attr = m.group(1), m.group(2)
  target = ROOT / ("d2g_jax" + path)
  if not target.exists():
    return f"no file {rel(target)}"
  if attr:
    module = "d2g_jax" + path.removesuffix(".py").replace("/", ".")
    return resolve_dotted(f"{module}.{attr}")
  return None


def resolve_dotted(name: str) -> str | None:
  """None when d2g_jax.x.y names a module or package, or an attribute reached from the
  longest such prefix (a class, a function, a method), else why not."""
  parts = name.split(".")
  k = len(parts)
  while k > 1:
    base = ROOT.joinpath(*parts[:k])
    if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
      break
    k -= 1
  module_name, rest = ".".join(parts[:k]), parts[k:]
  if not rest:
    return None
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:  # noqa: BLE001  (a broken module is a finding too)
    return f"import {module_name} failed: {type(e).__name__}: {e}"
  for i, attr in enumerate(rest):
    if not hasattr(obj, attr):
      return f"{'.'.join(parts[:k + i])} has no attribute {attr!r}"
    obj = getattr(obj, attr)
  return None


def resolve_repo_path(name: str) -> str | None:
  m = REPO_PATH.fullmatch(name)
  path, sep, attr = m.group(1), m.group(2), m.group(3)
  target = ROOT / path
  if not target.exists():
    return f"no file {path}"
  if sep == "::" and target.is_file():  # tests/test_x.py::test_name, x.py::function
    if not re.search(rf"^\s*(?:def|class) {attr}\b|^{attr}\s*=", target.read_text(), re.M):
      return f"{path} defines no {attr}"
  return None


MODULE_NAMES = named(MODULE_PATH) + named(DOTTED)
REPO_NAMES = named(REPO_PATH)


@pytest.mark.parametrize("page,name", MODULE_NAMES, ids=[f"{p}:{n}" for p, n in MODULE_NAMES])
def test_module_named_in_the_docs_exists(page, name):
  why = resolve_module_path(name) if MODULE_PATH.fullmatch(name) else resolve_dotted(name)
  assert why is None, f"{page} names `{name}`: {why}"


@pytest.mark.parametrize("page,name", REPO_NAMES, ids=[f"{p}:{n}" for p, n in REPO_NAMES])
def test_file_named_in_the_docs_exists(page, name):
  why = resolve_repo_path(name)
  assert why is None, f"{page} names `{name}`: {why}"
