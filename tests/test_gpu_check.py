"""benchmarks/gpu_check.py in its dry run on a tiny BERT: every requested family trains to a finite loss in
a timed row, the CUDA rows say why they did not run, the JSON holds the same rows as the table, and a
failing row is a row, not a crash."""

import importlib.util
import json
import math
import sys
from pathlib import Path

from conftest import GLUE_DIR

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check_bench", _PATH)
gc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gc  # its dataclasses look their module up there
_spec.loader.exec_module(gc)

HAS_DATA = (GLUE_DIR / "sst2" / "train.tsv").exists()


def _table(stdout: str) -> list[list[str]]:
    """The Markdown table's body rows, split into cells."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| backbone | method |")
    return [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in lines[1:]]


def _run(capsys, tmp_path, *extra):
    out = tmp_path / "gpu_check.json"
    rc = gc.main(["--dry-run", "--backbones", "tiny", "--no-search", "--out", str(out), *extra])
    assert rc == 0
    return _table(capsys.readouterr().out), json.loads(out.read_text())


def test_dry_run_rows(capsys, tmp_path):
    table, doc = _run(capsys, tmp_path, "--methods", "lora,full_finetuning,adapter_fusion", "--data-dir",
                      str(GLUE_DIR))
    rows = {(r["backbone"], r["method"], r["precision"]): r for r in doc["rows"]}
    assert doc["complete"] and doc["settings"]["dry_run"] and doc["settings"]["device"] == "cpu"
    for method in ("lora", "peft_lora", "full_finetuning"):
        r = rows[("tiny", method, "fp32")]
        assert r["status"] == "ok", r["note"]
        assert r["loss_finite"] is True and math.isfinite(r["loss"]) and 0 < r["loss"] < 5
        assert len(r["steps_ms"]) == 3 and r["ms_per_step"] > 0 and all(t > 0 for t in r["steps_ms"])
        assert len(r["losses"]) == 1 + 3  # warm-up + timed
        assert r["trainable_params"] > 0 and r["peak_cuda_mib"] is None  # no CUDA memory on the CPU
    full, lora = rows[("tiny", "full_finetuning", "fp32")], rows[("tiny", "lora", "fp32")]
    assert full["trainable_params"] > 100 * lora["trainable_params"]
    assert "autopeft LoRA / peft step time" in rows[("tiny", "peft_lora", "fp32")]["note"]
    assert rows[("any", "adapter_fusion", "any")]["note"].startswith("not run: needs stage-1")
    # bf16: run only where the CPU has bf16 hardware; else one row says why
    from autopeft.backbones.precision import cpu_bf16_flags

    if not cpu_bf16_flags():
        bf16 = [r for r in doc["rows"] if r["precision"] == "bf16"]
        assert len(bf16) == 1 and bf16[0]["note"].startswith("not run: no bf16 hardware")
        assert set(bf16[0]["extra"]["methods"]) == {"lora", "peft_lora", "full_finetuning"}
    search = [r for r in doc["rows"] if r["method"] == gc.SEARCH_LABEL]
    assert search == []  # --no-search
    trial = [r for r in doc["rows"] if r["method"] == "run_trial (lora)"]
    assert len(trial) == 1
    if HAS_DATA:
        t = trial[0]
        assert t["status"] == "ok", t["note"]
        assert t["precision"] == "auto -> fp32" and t["extra"]["precision"] == "fp32"
        assert t["loss_finite"] and t["extra"]["steps"] == 4 and t["ms_per_step"] > 0
    else:
        assert trial[0]["note"] == "not run: no SST-2 data"
    # the table and the JSON hold the same rows, in the same order
    assert [(c[0], c[1], c[2]) for c in table] == [(r["backbone"], r["method"], r["precision"]) for r in doc["rows"]]
    assert [c[-1] for c in table] == [r["note"] for r in doc["rows"]]


def test_cuda_rows_not_run_and_random_batches(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "g.json"
    rc = gc.main(["--dry-run", "--backbones", "tiny", "--methods", "lora", "--no-peft", "--no-trial",
                  "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "data: RANDOM token batches" in text
    doc = json.loads(out.read_text())
    by_method = {r["method"]: r for r in doc["rows"] if r["precision"] != "bf16"}
    assert by_method["lora"]["status"] == "ok" and by_method["lora"]["loss_finite"]
    search = by_method[gc.SEARCH_LABEL]
    assert search["status"] == "not run" and search["note"] == "not run: no CUDA"
    table = _table(text)
    assert any(c[1] == gc.SEARCH_LABEL and c[-1] == "not run: no CUDA" for c in table)


def test_qlora_cuda_row_not_run(capsys, tmp_path, monkeypatch):
    """Requested qlora: the CPU row runs on bitsandbytes' CPU backend (when installed) and the CUDA row
    is listed as not run."""
    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: False)
    _, doc = _run(capsys, tmp_path, "--methods", "qlora", "--no-trial", "--steps", "1", "--data-dir",
                  str(tmp_path / "nowhere"))
    cuda_row = [r for r in doc["rows"] if r["method"].startswith("qlora (NF4 on CUDA")]
    assert len(cuda_row) == 1 and cuda_row[0]["note"] == "not run: no CUDA"
    cpu_row = [r for r in doc["rows"] if r["method"] == "qlora" and r["precision"] == "fp32"][0]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert cpu_row["status"] == "failed"
    else:
        assert cpu_row["status"] == "ok", cpu_row["note"]
        assert cpu_row["loss_finite"] and cpu_row["extra"]["nf4_layers"] > 0


def test_a_failing_row_is_a_row(capsys, tmp_path, monkeypatch):
    """A recipe that cannot build fails its own row ('failed: <one line>'); the next row still runs and
    the exit code stays 0."""
    monkeypatch.setitem(gc.FAMILIES, "lora", [{"method": "lora", "r": 10_000}])  # rank above the matrix sizes
    table, doc = _run(capsys, tmp_path, "--methods", "lora,bitfit", "--no-peft", "--no-trial", "--data-dir",
                      str(tmp_path / "nowhere"))
    rows = {r["method"]: r for r in doc["rows"] if r["precision"] == "fp32"}
    assert rows["lora"]["status"] == "failed" and rows["lora"]["note"].startswith("failed: RecipeError: ")
    assert "\n" not in rows["lora"]["note"]
    assert rows["bitfit"]["status"] == "ok" and rows["bitfit"]["loss_finite"]
    assert any(c[1] == "lora" and c[-1].startswith("failed: ") for c in table)


def test_max_overlap():
    assert gc.max_overlap([]) == 0
    assert gc.max_overlap([(0, 10), (1, 9), (2, 8), (3, 7)]) == 4
    assert gc.max_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # one ends as the next starts
    assert gc.max_overlap([(0, 5), (6, 9), (4, 7)]) == 2
