"""The package as installed: every package directory and data file is in the wheel (configs/ as
pipelines/deployments/), every third-party module the shipped code imports is a declared dependency,
and a wheel installed elsewhere runs `validate` and `init` from an empty directory."""

import ast
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
SHIPPED = ("pipelines", "processors", "transports")
OWN = set(SHIPPED)
# imported, not declared: a module of a declared distribution, or optional and guarded by ImportError
PROVIDED = {"pydantic_core": "pydantic", "pesq": None}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _source_dir(package: str) -> Path:
    for prefix, where in sorted(SETUPTOOLS.get("package-dir", {}).items(), key=lambda kv: -len(kv[0])):
        if package == prefix or package.startswith(prefix + "."):
            return ROOT / where / Path(*package[len(prefix):].split(".")[1:]) if package != prefix else ROOT / where
    return ROOT / Path(*package.split("."))


def _shipped_files() -> dict[str, list[Path]]:
    """package -> the files of its directory the wheel carries (modules and package data)."""
    out = {}
    for package in SETUPTOOLS["packages"]:
        where = _source_dir(package)
        patterns = SETUPTOOLS["package-data"].get(package, [])
        excluded = SETUPTOOLS.get("exclude-package-data", {}).get(package, [])
        files = [p for p in where.iterdir() if p.is_file() and p.suffix == ".py"]
        for pattern in patterns:
            files += [p for p in where.glob(pattern) if p.is_file()
                      and not any(fnmatch.fnmatch(str(p.relative_to(where)), x) for x in excluded)]
        out[package] = files
    return out


def test_every_package_directory_and_data_file_is_shipped():
    listed = {_source_dir(p).resolve(): p for p in SETUPTOOLS["packages"]}
    shipped = {f.resolve() for files in _shipped_files().values() for f in files}
    for top in (*SHIPPED, "configs"):
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if "__pycache__" in rel.parts or rel.parts[:2] == ("configs", "kubernetes") or path.suffix == ".pyc":
                continue
            if path.is_dir():
                assert path.resolve() in listed, f"{rel}/ is not in pyproject.toml's packages"
            elif path.is_file():
                assert path.resolve() in shipped, f"{rel} would not be in the wheel (package-data)"
    assert _source_dir("pipelines.deployments") == ROOT / "configs"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_declared():
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_name(r) for reqs in PYPROJECT["project"]["optional-dependencies"].values() for r in reqs}
    distributions = packages_distributions()
    missing = []
    for package in SHIPPED:
        for path in (ROOT / package).rglob("*.py"):
            for module in _imports(path) - OWN:
                if module == "tests":
                    missing.append(f"{path.relative_to(ROOT)} imports the tests")
                if module in sys.stdlib_module_names or module in PROVIDED:
                    continue
                dists = {_name(d) for d in distributions.get(module, [module])}
                if not dists & (declared | extras):
                    missing.append(f"{path.relative_to(ROOT)}: {module} ({', '.join(sorted(dists))})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(sorted(set(missing)))
    for dist in PROVIDED.values():
        assert dist is None or _name(dist) in declared
    # audioop is in the standard library up to Python 3.12 only
    uses_audioop = any("audioop" in _imports(p) for package in SHIPPED for p in (ROOT / package).rglob("*.py"))
    assert uses_audioop == any(r.startswith("audioop-lts") and "python_version>='3.13'" in r.replace(" ", "")
                               for r in PYPROJECT["project"]["dependencies"])


def test_what_one_command_needs_is_an_extra_imported_late():
    optional = {"matplotlib": "report", "fastapi": "bench", "uvicorn": "bench"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, extra in optional.items():
        assert any(_name(r) == module for r in extras[extra]), (module, extra)
        assert not any(_name(r) == module for r in PYPROJECT["project"]["dependencies"]), module
        for package in SHIPPED:
            for path in (ROOT / package).rglob("*.py"):
                top_level = {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
                             for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))}
                assert module not in top_level, f"{path.relative_to(ROOT)} imports {module} at module level"
    assert "silero" not in extras  # pipecat ships the Silero ONNX model; onnxruntime runs it
    dev = " ".join(extras["dev"])
    assert all(name in dev for name in ("report", "bench", "cascaded", "pytest"))


def _can_build_offline() -> bool:
    try:
        from setuptools.command import bdist_wheel  # noqa: F401  (setuptools >= 70.1, the dev extra's)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _can_build_offline(), reason="needs setuptools>=70.1 (pip install -e '.[dev]')")
def test_a_wheel_runs_from_an_empty_directory(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in (*SHIPPED, "configs", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copyfile
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist")],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("call_pipelines-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True, timeout=300,
                   capture_output=True)
    assert (site / "pipelines" / "deployments" / "clips" / "greeting.wav").is_file()
    assert (site / "pipelines" / "sim" / "speech" / "question_8k.wav").is_file()
    assert not (site / "pipelines" / "deployments" / "kubernetes").exists() and not (site / "tests").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PERSONAPLEX_URL"} | {"PYTHONPATH": str(site)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipelines", *args], check=False, cwd=empty, env=env, capture_output=True,
                              text=True, timeout=120)

    for name in ("exotel.yaml", "twilio.yaml", "browser.yaml"):
        result = cli("validate", name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{site / 'pipelines' / 'deployments' / name}: ok")
    result = cli("init", "mine")
    assert result.returncode == 0, result.stderr
    assert cli("validate", "mine/exotel.yaml").returncode == 0
    assert sorted(os.listdir(empty)) == ["mine"]  # nothing else written where it ran
