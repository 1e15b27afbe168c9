"""The project's own docs/ cannot rot: examples run, the configuration reference is current, links resolve.

- Every ```python block of docs/*.md runs, in page order, in one namespace per page. Top-level
  `await` is allowed (the page runs as one coroutine), so async examples are executed as written.
  A page may declare `<!-- doctest-module: NAME -->`: its blocks then run as the module NAME, so a
  class it defines can be named by import path (`NAME.Class`) in its YAML.
- Every ```yaml block that is a deployment (it has `transport:`) is loaded and planned as
  `validate` would, at its place in the page (after the Python blocks before it).
- docs/configuration.md is exactly `pipelines.config_reference.render()`.
- No file of the repository points outside it, and every `docs/*.md` it names exists.
"""

import ast
import asyncio
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
MODULE = re.compile(r"<!--\s*doctest-module:\s*([A-Za-z_][\w.]*)\s*-->")
OUTSIDE = "../" + "shared"  # spelled in two pieces so this file does not match itself


def blocks(page: Path) -> list[tuple[str, str, int]]:
    text = page.read_text("utf-8")
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


def test_docs_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "architecture.md", "protocols.md", "configuration.md", "processors.md"} <= names


def _validate_deployment(source: str, page: Path, line: int, tmp_path: Path) -> None:
    from pipelines import builder, config

    path = tmp_path / f"{page.stem}-{line}.yaml"
    path.write_text(source)
    try:
        builder.plan(config.load(path, environ={}))
    except Exception as exc:  # noqa: BLE001 - reported with the block's place in the page
        pytest.fail(f"{page.name}:{line}: the YAML example does not validate: {exc}")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page: Path, tmp_path: Path, monkeypatch):
    found = blocks(page)
    if not any(kind in ("python", "yaml") for kind, _, _ in found):
        pytest.skip("no examples")
    declared = MODULE.search(page.read_text("utf-8"))
    name = declared.group(1) if declared else f"docs_{page.stem}"
    module = types.ModuleType(name)
    module.__file__ = str(page)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.chdir(tmp_path)
    for kind, source, line in found:
        if kind == "python":
            code = compile(ast.parse(source, filename=f"{page.name}:{line}"), f"{page.name}:{line}", "exec",
                           flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(code, module.__dict__)
            if asyncio.iscoroutine(result):
                asyncio.run(result)
        elif kind == "yaml":
            data = yaml.safe_load(source)
            if isinstance(data, dict) and "transport" in data:
                _validate_deployment(source, page, line, tmp_path)


def test_configuration_reference_is_current():
    from pipelines.config_reference import REGENERATE, render

    written = (DOCS / "configuration.md").read_text("utf-8")
    assert written == render(), (
        f"docs/configuration.md is out of date with the pydantic models; regenerate it: {REGENERATE}")


def test_doc_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    for page in PAGES:
        for target in link.findall(page.read_text("utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def repository_files() -> list[Path]:
    """Tracked and new (not ignored) files; everything under the root but .git when git is absent."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.relative_to(ROOT).parts]


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:4096]:
        return None
    return data.decode("utf-8", errors="replace")


def test_nothing_points_outside_the_repository():
    cited = re.compile(r"(?<![\w/.])docs/[\w.-]+\.md")
    outside, missing = [], []
    for path in repository_files():
        text = _text(path)
        if text is None:
            continue
        rel = path.relative_to(ROOT)
        if OUTSIDE in text:
            outside.append(str(rel))
        missing += [f"{rel}: {m}" for m in cited.findall(text) if not (ROOT / m).exists()]
    assert not outside, f"files that reference {OUTSIDE} (outside this repository): {outside}"
    assert not missing, f"citations of docs/ files that do not exist: {missing}"
