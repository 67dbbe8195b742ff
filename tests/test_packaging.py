"""Install as users install (issue 9, deliverable 7): what a wheel needs to work away from the source tree.

* the shipped search spaces are package data, found through ``importlib.resources``;
* every library the package imports is a declared dependency (scikit-learn once was not);
* an offline ``--backbone org/name`` fails at once with one line: when the hub does not answer a TCP
  connection within ``HUB_CONNECT_TIMEOUT_S``, transformers is asked for the local cache only
  (instead of huggingface_hub's five retries, ~23 s). The wall time is measured in
  ``benchmarks/offline_backbone.py``, not asserted here.
"""

import ast
import fnmatch
import importlib.metadata
import re
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


def test_shipped_search_spaces_are_package_data():
    from autopeft.hpo.space import SPACES_DIR, SearchSpace, shipped_spaces

    package = Path(autopeft.__file__).parent
    assert Path(str(SPACES_DIR)) == package / "search_spaces"  # inside the package, not the source tree
    files = sorted(p.name for p in (package / "search_spaces").glob("*"))
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["autopeft"]
    assert files and all(any(fnmatch.fnmatch(f"search_spaces/{f}", p) for p in patterns) for f in files)
    assert shipped_spaces() == ["autopeft_paper", "default", "full"]
    assert SearchSpace.load("default").name == "default"


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
