"""Install as users install (issue 9, deliverable 7): what a wheel needs to work away from the source tree.

* the shipped search spaces (``search_spaces/`` at the top of the repository) are package data of a
  built wheel, found through ``importlib.resources``;
* every library the package imports is a declared dependency (scikit-learn once was not);
* an offline ``--backbone org/name`` fails at once with one line: when the hub does not answer a TCP
  connection within ``HUB_CONNECT_TIMEOUT_S``, transformers is asked for the local cache only
  (instead of huggingface_hub's five retries, ~23 s). The wall time is measured in
  ``benchmarks/offline_backbone.py``, not asserted here.
"""

import ast
import importlib.metadata
import os
import re
import shutil
import socket
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import autopeft
from autopeft import backbones
from autopeft.backbones import BackboneError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()


def test_shipped_search_spaces_are_read_from_the_top_level_folder_in_a_checkout():
    from autopeft.searching.space import SPACES_DIR, SearchSpace, shipped_spaces

    if (Path(autopeft.__file__).parent / "search_spaces").is_dir():
        pytest.skip("autopeft is installed from a wheel here: the wheel test below covers it")
    assert Path(str(SPACES_DIR)) == ROOT / "search_spaces"  # the design card's top-level folder
    assert shipped_spaces() == ["autopeft_paper", "default", "full"]
    assert SearchSpace.load("default").name == "default"


def test_the_package_list_holds_every_package():
    """pyproject.toml lists the packages (to map search_spaces/ into the package); a new subpackage
    left out of the list would be missing from the wheel."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "autopeft").rglob("__init__.py")}
    assert found | {"autopeft.search_spaces"} == listed
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"autopeft.search_spaces": "search_spaces"}


def test_a_built_wheel_ships_the_search_spaces_inside_the_package(tmp_path):
    """Build the wheel from the project's files (no network: ``--no-build-isolation``), unpack it as an
    installation would, and import autopeft from there, in another folder: the spaces are package data."""
    import subprocess
    import zipfile

    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("autopeft", "search_spaces"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("autopeft-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    spaces = sorted(n for n in names if n.startswith("autopeft/search_spaces/"))
    assert spaces == [f"autopeft/search_spaces/{s}.yaml" for s in ("autopeft_paper", "default", "full")]
    assert not any(n.startswith("search_spaces/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import autopeft; from autopeft.searching.space import SPACES_DIR, SearchSpace, shipped_spaces; "
            "print(autopeft.__file__); print(SPACES_DIR); print(shipped_spaces()); print(SearchSpace.load('full').name)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    where, spaces_dir, shipped, full = run.stdout.strip().splitlines()[-4:]
    assert Path(where).parent == site / "autopeft"  # the unpacked wheel, not the source tree
    assert Path(spaces_dir) == site / "autopeft" / "search_spaces"
    assert shipped == "['autopeft_paper', 'default', 'full']" and full == "full"


def test_every_imported_library_is_a_declared_dependency():
    imported = set()
    for path in (ROOT / "autopeft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "autopeft"}
    to_dist = importlib.metadata.packages_distributions()
    declared = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    optional = {_dist_name(r) for extra in ("botorch",) for r in PYPROJECT["project"]["optional-dependencies"][extra]}
    missing = {}
    for module in sorted(third_party):
        dists = {_dist_name(d) for d in to_dist.get(module, [module])}
        if not dists & (declared | optional):
            missing[module] = sorted(dists)
    assert "sklearn" in third_party and "scikit-learn" in declared
    assert missing == {}


@pytest.fixture
def fresh_hub_check(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    check = backbones.hub_reachable
    check.cache_clear()
    yield
    check.cache_clear()  # tests may have swapped the function; clear the real one's answer


def test_hub_check_sees_a_closed_port_and_an_open_one(fresh_hub_check, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert backbones.hub_reachable() is True
    backbones.hub_reachable.cache_clear()
    assert backbones.hub_reachable() is False  # the port is closed now: refused at once


def test_offline_hub_id_reads_the_local_cache_only_and_fails_in_one_line(fresh_hub_check, monkeypatch):
    from transformers import AutoConfig

    calls = []
    real = AutoConfig.from_pretrained.__func__

    def spy(cls, source, *args, **kwargs):
        calls.append((source, kwargs.get("local_files_only")))
        return real(cls, source, *args, **kwargs)

    monkeypatch.setattr(backbones, "hub_reachable", lambda: False)
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(spy))
    with pytest.raises(BackboneError, match=r"hub \(.*\) is unreachable and 'org/does-not-exist' is not in the local cache"):
        backbones.load_config("org/does-not-exist", 2)
    assert calls == [("org/does-not-exist", True)]  # no network: huggingface_hub never retried
    assert backbones.load_config("minilm-l6", 2).hidden_size == 384  # a local folder needs no hub


def test_cli_offline_backbone_is_one_error_line_and_exit_2(fresh_hub_check, monkeypatch, tmp_path):
    from autopeft.cli import app

    monkeypatch.setattr(backbones, "hub_reachable", lambda: False)
    res = CliRunner().invoke(app, ["search", "--backbone", "org/does-not-exist", "--output-dir", str(tmp_path)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load backbone 'org/does-not-exist'")
