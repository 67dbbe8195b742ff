"""GPU check: one short run that tells whether autopeft trains on a CUDA machine, printed as one table.

What it checks, one table row each (every row in its own try/except: a failure is printed as a row
``failed: <one line>`` and the script goes on; the exit code is 0 unless the script itself is broken):

* **every method family**, one short training run (``--warmup`` untimed then ``--steps`` timed
  optimiser steps, 3 + 15 by default, on batches of 32 SST-2 sentences grouped by length as the
  trainer groups them, the longest batch first), in fp32 and bf16, on MiniLM-L6 and on a
  BERT-base-sized backbone built from a config (random weights, no download): median step time, peak
  CUDA memory of the row (``torch.cuda.max_memory_allocated`` from just before its model is built
  through its warm-up, less what was allocated then: its weights, gradients, optimiser state and
  activations), the last training loss and whether every loss was finite. The
  model is built, cast and optimised the way ``autopeft.training.trainer.run_trial`` does it
  (``check_recipe``, ``build_model``, ``set_precision``: float32 trainable weights, frozen Linear
  weights in the compute dtype, autocast in ``ComposedModel.forward``; ``make_optimizer``: a paged AdamW
  for QLoRA on CUDA; the methods' regularisation and step hooks). Families: lora, adalora, adapter
  (Houlsby serial and Pfeiffer parallel), prefix_tuning, p_tuning, p_tuning_v2, bitfit, unipelt,
  mam, adapter_drop (over a Pfeiffer adapter), full_finetuning, qlora (NF4 via bitsandbytes; its
  4-bit matmuls in the row's precision). adapter_fusion is listed as not run: it needs stage-1
  adapter folders (tests/test_adapter_fusion.py covers it).
* **peft's LoRA** (same rank and targets) next to ours, steps interleaved with our LoRA's on the same
  batches, so load on the machine hits both alike; its note gives the ratio of the two step times.
* **run_trial**: one whole trial through the trainer (``precision: auto``, which must resolve to
  bf16 on a bf16 GPU), as a search trial runs it: steps, evaluation, ``TrialResult``.
* **search**: 4 trials with fractional GPUs (0.25 GPU and 2 CPUs each, 256 training examples) through
  Ray Tune into MLflow (a SQLite store in a temporary folder): trials run, how many ran at once (from
  their MLflow run times), whether MLflow holds every trial with its score, wall time. The row fails
  unless all 4 trained, MLflow holds them and the finished parent run, and at least 2 ran at once.
  The search's own progress lines go to stderr.

Run it on a GPU machine (about 8 minutes at most on one H100; ``--time-limit`` keeps it there: rows
that would start after it are listed ``not run: time limit``, and the search keeps its share)::

    python benchmarks/gpu_check.py                      # needs CUDA; the table goes to stdout
    python benchmarks/gpu_check.py --dry-run            # CPU, MiniLM, fp32, 3 timed steps: ~1-2 min

``--dry-run`` (also what runs on a machine without CUDA) trains on the CPU: MiniLM only (the
BERT-base rows are ``not run: dry run``), fp32 only unless the CPU has bf16 hardware
(``autopeft.backbones.precision.cpu_bf16_flags``; elsewhere bf16 matmuls run emulated, ~1 GFLOP/s), and the
CUDA-only rows (QLoRA on CUDA, the fractional-GPU search) are ``not run: no CUDA``. On the CPU the
qlora rows run on bitsandbytes' CPU backend with float32 4-bit matmuls.

The table is also written as JSON (``--out``; default ``gpu_check.json`` in ``$OUT`` when that is
set, else in the current folder), rewritten after every row, so a run cut short keeps what it did.
SST-2 comes from ``--data-dir`` (default ``../shared/data/glue`` beside the repository); without it
the step rows train on random token batches (said in the header) and the rows that need the task's
data (run_trial, search) are not run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Ray's trial workers import autopeft too: they inherit this process's environment, not its sys.path.
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub (MiniLM is bundled)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import warnings  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, on stderr

DATA = ROOT.parent / "shared" / "data" / "glue"
BATCH = 32
#: Distinct batches the step rows cycle through.
N_BATCHES = 6
#: BERT-base sizes (bert-base-uncased), random weights: no download.
BERT_BASE = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512}
#: A tiny BERT for tests (tests/conftest.py's TINY_BERT with the BERT tokenizer's vocabulary).
TINY = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "vocab_size": 30522, "max_position_embeddings": 160}
BACKBONES: dict[str, str | dict] = {"minilm-l6": "minilm-l6", "bert-base": BERT_BASE, "tiny": TINY}

LORA = {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}
PFEIFFER = {"method": "adapter", "variant": "pfeiffer", "placement": "parallel", "reduction_factor": 16}
#: One representative recipe (components) per method family; the keys are ``--methods`` names.
FAMILIES: dict[str, list[dict]] = {
    "lora": [LORA],
    "adalora": [{"method": "adalora", "init_r": 12, "target_r": 8}],
    "adapter_houlsby": [{"method": "adapter", "variant": "houlsby", "placement": "serial", "reduction_factor": 16}],
    "adapter_pfeiffer": [PFEIFFER],
    "prefix_tuning": [{"method": "prefix_tuning", "num_virtual_tokens": 10}],
    "p_tuning": [{"method": "p_tuning", "num_virtual_tokens": 20}],
    "p_tuning_v2": [{"method": "p_tuning_v2"}],
    "bitfit": [{"method": "bitfit"}],
    "unipelt": [{"method": "unipelt"}],
    "mam": [{"method": "mam"}],
    "adapter_drop": [PFEIFFER, {"method": "adapter_drop", "n": 2}],
    "full_finetuning": [{"method": "full_finetuning"}],
    "qlora": [{"method": "qlora", "r": 8, "lora_alpha": 16}],  # compute_dtype: the row's precision
}
#: Families listed but never run, with the reason.
SKIPPED_FAMILIES = {"adapter_fusion": "needs stage-1 adapter folders (two trained runs first); "
                                      "tests/test_adapter_fusion.py covers it"}
#: Learning rates of the step rows: a usual PEFT rate, and BERT's fine-tuning rate for full fine-tuning.
LR_PEFT, LR_FULL = 1e-3, 5e-5
PEFT_LORA = "peft_lora"
QLORA_COMPUTE = {"fp32": "float32", "bf16": "bfloat16"}
#: Seconds the search keeps of --time-limit: the step rows stop starting before it.
SEARCH_RESERVE_S = 170


class RowTimeout(Exception):
    """A row ran past its time (SIGALRM)."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`RowTimeout` in the main thread after ``seconds`` (None / no SIGALRM: no limit)."""
    import threading

    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _fire(signum, frame):
        raise RowTimeout(f"timed out after {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Row:
    """One table row (also one JSON object)."""

    backbone: str
    method: str
    precision: str
    status: str = "not run"  # ok | failed | not run
    ms_per_step: float | None = None
    peak_cuda_mib: float | None = None
    loss: float | None = None
    loss_finite: bool | None = None
    note: str = ""
    device: str = ""
    trainable_params: int | None = None
    steps_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    wall_s: float | None = None

    def fail(self, exc: BaseException | str) -> "Row":
        self.status = "failed"
        msg = exc if isinstance(exc, str) else one_line(exc)
        self.note = f"failed: {msg}" + (f"; {self.note}" if self.note else "")
        return self

    def skip(self, reason: str) -> "Row":
        self.status, self.note = "not run", f"not run: {reason}"
        return self


COLUMNS = ("backbone", "method", "precision", "ms/step", "peak CUDA MiB", "last loss (finite)", "note")


def table_line(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def row_cells(r: Row) -> list[str]:
    ms = "-" if r.ms_per_step is None else f"{r.ms_per_step:.1f}" if r.ms_per_step >= 10 else f"{r.ms_per_step:.2f}"
    if r.peak_cuda_mib is not None:
        mem = f"{r.peak_cuda_mib:,.0f}"
    else:
        mem = "n/a" if r.status == "ok" and r.device == "cpu" else "-"
    if r.loss_finite is None:
        loss = "-"
    else:
        loss = f"{r.loss:.4f} ({'finite' if r.loss_finite else 'NOT finite'})" if r.loss is not None else \
            ("finite" if r.loss_finite else "NOT finite")
    return [r.backbone, r.method, r.precision, ms, mem, loss, r.note.replace("|", "/")]


class Report:
    """Prints each row as it finishes (one Markdown table) and keeps the JSON file current."""

    def __init__(self, out: Path, env: dict[str, Any], settings: dict[str, Any]) -> None:
        self.out, self.env, self.settings, self.rows = out, env, settings, []
        self.t0 = time.perf_counter()

    def start_table(self) -> None:
        print(table_line(COLUMNS))
        print("|" + "|".join("---" for _ in COLUMNS) + "|", flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(table_line(row_cells(row)), flush=True)
        self.write()

    def write(self, done: bool = False) -> None:
        doc = {"env": self.env, "settings": self.settings, "complete": done,
               "elapsed_s": round(time.perf_counter() - self.t0, 1), "columns": list(COLUMNS),
               "rows": [asdict(r) for r in self.rows]}
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1, default=str))
            os.replace(tmp, self.out)
        except OSError as exc:  # a read-only folder: the table on stdout still stands
            log(f"cannot write {self.out}: {one_line(exc)}")


# ----------------------------------------------------------------------------------------------------
# environment and data


def environment() -> dict[str, Any]:
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        try:
            p = torch.cuda.get_device_properties(0)
            env.update(cuda_device=torch.cuda.get_device_name(0), cuda_capability=f"{p.major}.{p.minor}",
                       cuda_memory_gib=round(p.total_memory / 2**30, 1), cuda_runtime=torch.version.cuda,
                       cuda_bf16=bool(torch.cuda.is_bf16_supported()),
                       tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            env["cuda_error"] = one_line(exc)
    try:
        from autopeft.backbones.precision import cpu_bf16_flags

        env["cpu_bf16_flags"] = list(cpu_bf16_flags())
    except Exception as exc:  # noqa: BLE001
        env["cpu_bf16_flags"] = f"error: {one_line(exc)}"
    for mod in ("bitsandbytes", "peft", "transformers", "ray", "mlflow", "optuna"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - a missing package is a finding, not a crash
            env[mod] = f"missing ({type(exc).__name__})"
    try:
        import autopeft

        env["autopeft"] = f"{getattr(autopeft, '__version__', '?')} at {Path(autopeft.__file__).parent}"
    except Exception as exc:  # noqa: BLE001
        env["autopeft"] = f"import failed: {one_line(exc)}"
    try:
        import subprocess

        env["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git there
        env["git_commit"] = None
    return env


def load_batches(data_dir: Path | None, device: torch.device, n_batches: int = N_BATCHES,
                 seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], str]:
    """``n_batches`` training batches of ``BATCH`` on ``device`` and a line saying what they are: real SST-2
    sentences (the first 4,096 of train, tokenised by the BERT tokenizer that MiniLM and bare configs
    share, batches grouped by length as the trainer does) or, without the data, random tokens."""
    try:
        if data_dir is None:
            raise FileNotFoundError("no sst2 folder in --data-dir")
        from autopeft.backbones import MINILM, load_tokenizer
        from autopeft.data.splits import Split
        from autopeft.data.tasks import get_task, load_split
        from autopeft.training.batches import Batches, length_grouped_order

        full = load_split(get_task("sst2"), "train", data_dir)
        n = min(len(full), 4096)
        split = Split(full.texts[:n], full.labels[:n])
        b = Batches(split, load_tokenizer(MINILM), 128, device)
        order = length_grouped_order(b.lengths, n_batches * BATCH, BATCH, seed)
        batches = [b.batch(order[i * BATCH:(i + 1) * BATCH]) for i in range(n_batches)]
        batches.sort(key=lambda x: -x["input_ids"].shape[1])  # the longest first: every warm-up (peak memory) has it
        tokens = sum(int(x["attention_mask"].sum()) for x in batches) / n_batches
        return batches, (f"SST-2 train ({data_dir}), batches of {BATCH} grouped by length, {tokens:.0f} real tokens "
                         f"a batch on average")
    except Exception as exc:  # noqa: BLE001 - fall back, and say so
        g = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(n_batches):
            lengths = torch.randint(8, 48, (BATCH,), generator=g)
            t = int(lengths.max())
            ids = torch.randint(1000, 30000, (BATCH, t), generator=g)
            mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
            ids = ids * mask
            ids[:, 0] = 101  # [CLS]
            batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                            "token_type_ids": torch.zeros_like(ids).to(device),
                            "labels": torch.randint(0, 2, (BATCH,), generator=g).to(device)})
        batches.sort(key=lambda x: -x["input_ids"].shape[1])
        return batches, f"RANDOM token batches of {BATCH} (8-47 tokens): no SST-2 data ({one_line(exc)})"


# ----------------------------------------------------------------------------------------------------
# step rows


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_ours(backbone: str | dict, components: list[dict], precision: str, dev: torch.device,
               total_steps: int):
    """Our model for ``components`` in ``precision``, set up as ``run_trial`` sets up a trial; returns
    ``(step(batch) -> loss, keep-alive objects, facts for the note)``."""
    from autopeft.composition.model import count_parameters
    from autopeft.backbones.precision import grad_scaler
    from autopeft.composition.recipe import build_model, check_recipe, recipe_from_dict
    from autopeft.training.setup import set_gradient_checkpointing, set_precision
    from autopeft.training.trainer import make_optimizer

    full = any(c["method"] == "full_finetuning" for c in components)
    recipe = recipe_from_dict({"backbone": backbone, "task": "sst2", "components": components, "pooling": "mean",
                               "training": {"precision": precision, "batch_size": BATCH,
                                            "learning_rate": LR_FULL if full else LR_PEFT,
                                            "max_train_examples": BATCH * total_steps,
                                            "gradient_checkpointing": False}})
    check_recipe(recipe, for_training=True)
    tr = recipe.training
    model = build_model(recipe, device=str(dev)).to(dev)
    counts = count_parameters(model)
    resolved = set_precision(model, recipe, dev)
    set_gradient_checkpointing(model, recipe)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if model.is_head_parameter(n)]
    rest = [p for n, p in trainable if not model.is_head_parameter(n)]
    groups = [g for g in ({"params": rest, "lr": tr.learning_rate}, {"params": head, "lr": tr.learning_rate})
              if g["params"]]
    messages: list[str] = []
    optimizer = make_optimizer(model, groups, tr.weight_decay, dev, messages.append)
    model.total_steps = total_steps
    scaler = grad_scaler(dev, resolved)
    state = {"step": 0}

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model(**batch).loss
        reg = model.regularization()
        if reg is not None:
            loss = loss + reg
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        model.after_step(state["step"])
        return float(loss.item())

    facts: dict[str, Any] = {"trainable_params": counts.trainable_params, "resolved_precision": resolved,
                             "optimizer": type(optimizer).__name__, "messages": messages}
    if getattr(model, "quantized", False):
        from autopeft.backbones.quantization import nf4_linear_class

        facts["nf4_layers"] = sum(isinstance(m, nf4_linear_class()) for m in model.modules())
    return step, (model, optimizer), facts


def build_peft(backbone: str | dict, precision: str, dev: torch.device):
    """peft's LoRA r=8 (alpha 16) on query/value over the same backbone (same seed). bf16: base weights
    in bf16, adapters float32 (peft's ``autocast_adapter_dtype``), forward under autocast: peft's own
    recipe."""
    import peft

    from autopeft.backbones import load_model

    base = load_model(backbone, 2, device=str(dev), seed=0).to(dev)
    if precision == "bf16":
        base = base.to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                      target_modules=["query", "value"])).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR_PEFT)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(batch: dict[str, torch.Tensor]) -> float:
        with torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    facts = {"trainable_params": sum(p.numel() for p in params), "resolved_precision": precision,
             "optimizer": type(opt).__name__, "messages": []}
    return step, (model, opt), facts


@dataclass
class Entry:
    row: Row
    build: Callable[[], tuple]
    step: Callable | None = None
    keep: tuple = ()
    baseline: int = 0


def measure(entries: list[Entry], batches: list[dict], dev: torch.device, warmup: int, steps: int,
            row_timeout: float | None) -> None:
    """Build each entry's model and run its warm-up steps, then time ``steps`` steps of every entry
    interleaved (one step of each per round, the same batch). Peak CUDA memory of an entry: after its
    warm-up (its optimiser state exists then), ``max_memory_allocated`` since just before it was built
    less what was allocated then; entries built before it hold only weights and optimiser state
    meanwhile (gradients are freed after each step), so this is its own. Fills each entry's row; one
    entry's failure leaves the others."""
    cuda = dev.type == "cuda"
    for e in entries:
        t0 = time.perf_counter()
        try:
            with time_limit(row_timeout):
                if cuda:
                    sync(dev)
                    e.baseline = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                e.step, e.keep, facts = e.build()
                e.row.trainable_params = facts.get("trainable_params")
                e.row.extra.update({k: v for k, v in facts.items() if k != "trainable_params"})
                for i in range(warmup):
                    e.row.losses.append(e.step(batches[i % len(batches)]))
                sync(dev)
                if cuda:  # its own peak: entries built before it hold only weights and optimiser state now
                    peak = torch.cuda.max_memory_allocated(dev)
                    e.row.peak_cuda_mib = (peak - e.baseline) / 2**20
                    e.row.extra.update(max_memory_allocated_bytes=int(peak),
                                       allocated_before_build_bytes=int(e.baseline))
        except Exception as exc:  # noqa: BLE001 - the row fails, the check goes on
            e.row.fail(exc)
            e.step, e.keep = None, ()
        e.row.wall_s = time.perf_counter() - t0
    live = [e for e in entries if e.step is not None]
    for r in range(steps):
        batch = batches[(warmup + r) % len(batches)]
        for e in list(live):
            t0 = time.perf_counter()
            try:
                with time_limit(row_timeout):
                    sync(dev)
                    t = time.perf_counter()
                    loss = e.step(batch)
                    sync(dev)
                    e.row.steps_ms.append((time.perf_counter() - t) * 1e3)
                    e.row.losses.append(loss)
            except Exception as exc:  # noqa: BLE001
                e.row.fail(exc)
                live.remove(e)
            e.row.wall_s = (e.row.wall_s or 0.0) + time.perf_counter() - t0
    for e in entries:
        row = e.row
        if row.losses:
            row.loss = row.losses[-1]
            bad = [i for i, v in enumerate(row.losses) if not math.isfinite(v)]
            row.loss_finite = not bad
            if bad and row.status != "failed":
                row.fail(f"loss {row.losses[bad[0]]} at step {bad[0] + 1}")
        if row.steps_ms:
            row.ms_per_step = statistics.median(row.steps_ms)
        if row.status != "failed":
            row.status = "ok"
        e.step, e.keep = None, ()
    free_memory()


def step_rows(backbone_name: str, backbone: str | dict, precision: str, methods: list[str], batches: list[dict],
              dev: torch.device, a: argparse.Namespace, report: Report, out_of_time: Callable[[], bool]) -> None:
    total = a.warmup + a.steps
    for method in methods:
        rows = [Row(backbone_name, method, precision, device=dev.type)]
        if out_of_time():
            report.add(rows[0].skip("time limit"))
            if method == "lora" and a.peft:
                report.add(Row(backbone_name, PEFT_LORA, precision, device=dev.type).skip("time limit"))
            continue
        comps = [dict(c) for c in FAMILIES[method]]
        if method == "qlora":
            comps[0]["compute_dtype"] = QLORA_COMPUTE[precision]
        entries = [Entry(rows[0], lambda comps=comps: build_ours(backbone, comps, precision, dev, total))]
        if method == "lora" and a.peft:
            rows.append(Row(backbone_name, PEFT_LORA, precision, device=dev.type))
            entries.append(Entry(rows[1], lambda: build_peft(backbone, precision, dev)))
        measure(entries, batches, dev, a.warmup, a.steps, a.row_timeout)
        for e in entries:
            annotate(e.row, dev)
        if len(rows) == 2 and rows[0].ms_per_step and rows[1].ms_per_step:
            ratio = rows[0].ms_per_step / rows[1].ms_per_step
            rows[1].note = (f"{rows[1].note}; " if rows[1].note else "") + \
                f"autopeft LoRA / peft step time {ratio:.2f} (interleaved)"
            rows[1].extra["ours_over_peft"] = ratio
        for r in rows:
            report.add(r)


def annotate(row: Row, dev: torch.device) -> None:
    """The note of a finished step row: trainable parameters and what the row's set-up resolved to."""
    x = row.extra
    parts = []
    if row.trainable_params is not None:
        parts.append(f"trainable {row.trainable_params:,}")
    if x.get("resolved_precision") and x["resolved_precision"] != row.precision:
        parts.append(f"ran as {x['resolved_precision']}")
    if row.method == "qlora" and "optimizer" in x:
        parts.append(f"NF4 layers {x.get('nf4_layers', 0)} on {dev.type}, {x['optimizer']}")
    if row.steps_ms:
        parts.append(f"{len(row.steps_ms)} timed steps")
    if x.get("messages"):
        parts.append("; ".join(x["messages"]))
    note = ", ".join(parts)
    row.note = f"{row.note}; {note}" if row.note and note else (row.note or note)


# ----------------------------------------------------------------------------------------------------
# run_trial and search rows


def trial_row(backbone_name: str, backbone: str | dict, data_dir: Path | None, dev: torch.device,
              a: argparse.Namespace) -> Row:
    """One whole trial through ``autopeft.training.trainer.run_trial`` with ``precision: auto``, which must
    resolve as :func:`autopeft.backbones.precision.resolve_precision` says for the device (bf16 on a bf16 GPU)."""
    row = Row(backbone_name, "run_trial (lora)", "auto", device=dev.type)
    if data_dir is None:
        return row.skip("no SST-2 data")
    t0 = time.perf_counter()
    try:
        from autopeft.backbones.precision import resolve_precision

        expected = resolve_precision("auto", dev)
        row.precision = f"auto -> {expected}"
        with time_limit(a.row_timeout * 2 if a.row_timeout else None):
            from autopeft.composition.recipe import check_recipe, recipe_from_dict
            from autopeft.training.trainer import run_trial

            examples = BATCH * (a.warmup + a.steps)
            recipe = recipe_from_dict({"backbone": backbone, "task": "sst2", "components": [LORA], "pooling": "mean",
                                       "training": {"precision": "auto", "batch_size": BATCH, "learning_rate": LR_PEFT,
                                                    "max_train_examples": examples,
                                                    "max_eval_examples": 256 if dev.type == "cuda" else 64}})
            check_recipe(recipe, for_training=True)
            losses: list[float] = []
            result, model = run_trial(recipe, str(data_dir), device=str(dev),
                                      on_step=lambda seen, loss, secs: losses.append(float(loss)))
            del model
        row.losses, row.trainable_params = losses, result.trainable_params
        row.ms_per_step = result.train_time_s / max(1, result.steps) * 1e3
        row.loss = losses[-1] if losses else None
        row.loss_finite = bool(losses) and all(math.isfinite(v) for v in losses)
        if dev.type == "cuda":
            row.peak_cuda_mib = result.peak_memory_bytes / 2**20
        row.extra = {"train_time_s": result.train_time_s, "wall_time_s": result.wall_time_s, "steps": result.steps,
                     "score": result.score, "eval_examples": result.eval_examples,
                     "peak_memory_bytes": result.peak_memory_bytes, "precision": result.precision}
        row.status = "ok"
        row.note = (f"{result.steps} steps (mean incl. the first), {result.eval_split} accuracy {result.score:.3f} on "
                    f"{result.eval_examples}, TrialResult.precision {result.precision}"
                    + ("" if dev.type == "cuda" else f", trainer's CPU memory account "
                       f"{result.peak_memory_bytes / 2**20:,.0f} MiB"))
        if result.precision != expected:
            row.fail(f"precision auto resolved to {result.precision}, expected {expected}")
        elif not row.loss_finite:
            row.fail("non-finite training loss")
    except Exception as exc:  # noqa: BLE001
        row.fail(exc)
    row.wall_s = time.perf_counter() - t0
    free_memory()
    return row


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


SEARCH_TRIALS, SEARCH_GPUS = 4, 0.25
SEARCH_LABEL = f"search: {SEARCH_TRIALS} trials @ {SEARCH_GPUS:g} GPU (Ray -> MLflow)"


def search_cpus() -> int:
    """CPUs per search trial: 2, or what the machine has for 4 trials at once."""
    return max(1, min(2, (os.cpu_count() or 1) // SEARCH_TRIALS))


def search_row(data_dir: Path | None, dev: torch.device, seconds: float, gpus: float = SEARCH_GPUS,
               trials: int = SEARCH_TRIALS, cpus: int | None = None, max_train_examples: int = 256) -> Row:
    """``trials`` trials at ``gpus`` GPU each (default 4 at 0.25) through Ray Tune into a fresh MLflow store
    (a temporary folder); the row fails unless every trial trained, MLflow holds each with its score and
    the parent run FINISHED, and at least two trials ran at once."""
    cpus = cpus or search_cpus()
    row = Row("minilm-l6", f"search: {trials} trials @ {gpus:g} GPU (Ray -> MLflow)", "auto", device=dev.type)
    if gpus and dev.type != "cuda":
        return row.skip("no CUDA" if not torch.cuda.is_available() else "dry run on CPU")
    if data_dir is None:
        return row.skip("no SST-2 data")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-search-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    t0 = time.perf_counter()
    try:
        free_memory()
        budget_s = max(30.0, min(240.0, seconds - 60))
        with time_limit(budget_s + 150):
            from autopeft.api import search

            res = search(task="sst2", budget="0.5%", backbone="minilm-l6", trials=trials,
                         max_train_examples=max_train_examples,
                         gpus_per_trial=gpus, cpus_per_trial=cpus, data_dir=str(data_dir),
                         output_dir=str(tmp / "runs"), tracking_uri=uri, experiment="gpu-check", name="gpu-check",
                         training={"precision": "auto"}, progress=lambda m: log(f"[search] {m}"),
                         time_budget_s=budget_s)
        wall = time.perf_counter() - t0
        statuses: dict[str, int] = {}
        for t in res.trials:
            statuses[t["status"]] = statuses.get(t["status"], 0) + 1
        trained = [t for t in res.trials if t["status"] in ("finished", "stopped_early", "failed", "interrupted")]
        last_rows = [t["rows"][-1] for t in trained if t.get("rows")]
        per_step = [r["train_time_s"] / r["steps"] * 1e3 for r in last_rows if r.get("steps")]
        peaks = [r["peak_memory_bytes"] for r in last_rows
                 if isinstance(r.get("peak_memory_bytes"), (int, float)) and math.isfinite(r["peak_memory_bytes"])]
        precisions = sorted({str(r.get("precision")) for r in last_rows})
        errors = [t["error"] for t in res.trials if t["status"] == "failed" and t.get("error")]
        # MLflow: the parent run and one nested run per trial, with their start / end times
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("gpu-check")
        runs = client.search_runs([exp.experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{res.mlflow_run_id}'") if exp else []
        trial_runs = [r for r in runs if r.data.tags.get("autopeft.kind") == "trial"
                      and r.data.tags.get("status") in ("finished", "stopped_early", "failed", "interrupted")]
        parent = client.get_run(res.mlflow_run_id) if res.mlflow_run_id else None
        intervals = [(r.info.start_time, r.info.end_time) for r in trial_runs if r.info.start_time and r.info.end_time]
        at_once = max_overlap(intervals)
        with_score = sum(1 for r in trial_runs if "score" in r.data.metrics)
        row.precision = "auto -> " + "/".join(precisions) if precisions else "auto"
        row.ms_per_step = statistics.median(per_step) if per_step else None
        if gpus:  # a trial's peak_memory_bytes is max_memory_allocated on CUDA (the trainer's own account on CPU)
            row.peak_cuda_mib = max(peaks) / 2**20 if peaks else None
        row.extra = {"statuses": statuses, "trials_trained": len(trained), "mlflow_trial_runs": len(trial_runs),
                     "mlflow_trial_runs_with_score": with_score, "max_trials_at_once": at_once,
                     "parent_status": parent.info.status if parent else None, "pareto": len(res.pareto),
                     "search_wall_s": res.wall_time_s, "wall_s": wall, "errors": errors[:3],
                     "trial_intervals_ms": intervals}
        row.loss_finite = None
        row.status = "ok"
        by_status = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
        row.note = (f"{gpus:g} GPU + {cpus} CPU a trial; {len(trained)}/{trials} trials trained ({by_status}); "
                    f"up to {at_once} at once (MLflow run times); MLflow: {len(trial_runs)} trial runs "
                    f"({with_score} with a score), parent {parent.info.status if parent else 'missing'}; "
                    f"Pareto {len(res.pareto)}; wall {wall:.0f}s; ms/step: median over trials, memory: max")
        problems = []
        if len(trained) < trials:
            problems.append(f"only {len(trained)} of {trials} trials trained")
        if errors:
            problems.append(f"trial error: {' '.join(str(errors[0]).split())[:200]}")
        if len(trial_runs) != len(trained) or with_score < len([t for t in trained if t.get("rows")]):
            problems.append(f"MLflow holds {len(trial_runs)} trial runs ({with_score} with a score) for "
                            f"{len(trained)} trials")
        if parent is None or parent.info.status != "FINISHED":
            problems.append("the MLflow parent run is not FINISHED")
        if at_once < 2:
            problems.append(f"trials did not overlap (max {at_once} at once)")
        if problems:
            row.fail("; ".join(problems))
    except Exception as exc:  # noqa: BLE001
        row.fail(exc)
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    row.wall_s = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, MiniLM only, fp32 only (bf16 where the CPU has bf16 hardware), 3 timed steps; the "
                         "CUDA rows marked not run")
    ap.add_argument("--data-dir", default=str(DATA), help="GLUE folder holding sst2 (default: %(default)s)")
    ap.add_argument("--out", default=None,
                    help="JSON output (default: gpu_check.json in $OUT when set, else in the current folder)")
    ap.add_argument("--methods", default=",".join([*FAMILIES, *SKIPPED_FAMILIES]),
                    help="comma-separated method families (default: all): " + ", ".join([*FAMILIES, *SKIPPED_FAMILIES]))
    ap.add_argument("--backbones", default=None,
                    help="comma-separated backbones among " + ", ".join(BACKBONES) + " (default: minilm-l6,bert-base; "
                         "the dry run lists bert-base as not run unless named here)")
    ap.add_argument("--no-peft", dest="peft", action="store_false", help="leave out peft's LoRA beside ours")
    ap.add_argument("--no-trial", dest="trial", action="store_false", help="leave out the run_trial row")
    ap.add_argument("--no-search", dest="search", action="store_false", help="leave out the Ray search row")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3; dry run 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 15; dry run 3)")
    ap.add_argument("--time-limit", type=float, default=450.0,
                    help="seconds: rows that would start later are not run (default %(default)s; the search keeps "
                         f"its last {SEARCH_RESERVE_S}s)")
    ap.add_argument("--row-timeout", type=float, default=None,
                    help="seconds one row may take before it is failed (default 90; dry run 150)")
    a = ap.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in FAMILIES and m not in SKIPPED_FAMILIES]
    if unknown:
        ap.error(f"unknown --methods {', '.join(unknown)}; valid: {', '.join([*FAMILIES, *SKIPPED_FAMILIES])}")
    a.methods = methods
    if a.warmup is not None and a.warmup < 1:
        ap.error("--warmup must be at least 1 (the row's peak memory is read after it)")
    if a.steps is not None and a.steps < 1:
        ap.error("--steps must be at least 1")
    if a.backbones is not None:
        names = [b.strip() for b in a.backbones.split(",") if b.strip()]
        bad = [b for b in names if b not in BACKBONES]
        if bad:
            ap.error(f"unknown --backbones {', '.join(bad)}; valid: {', '.join(BACKBONES)}")
        a.backbones = names
    return a


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    a = parse_args(argv)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    cuda = torch.cuda.is_available()
    forced_dry = not a.dry_run and not cuda
    dry = a.dry_run or not cuda
    dev = torch.device("cpu" if dry else "cuda")
    a.warmup = a.warmup if a.warmup is not None else (1 if dry else 3)
    a.steps = a.steps if a.steps is not None else (3 if dry else 15)
    a.row_timeout = a.row_timeout if a.row_timeout is not None else (150.0 if dry else 90.0)
    out = Path(a.out) if a.out else Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else \
        Path("gpu_check.json")
    backbones = a.backbones if a.backbones is not None else ["minilm-l6", "bert-base"]
    run_backbones = backbones if (a.backbones is not None or not dry) else [b for b in backbones if b != "bert-base"]

    from autopeft.backbones.precision import cpu_bf16_flags

    if dry:
        bf16_ok = bool(cpu_bf16_flags())
    else:
        bf16_ok = bool(torch.cuda.is_bf16_supported())
    precisions = ["fp32", "bf16"]

    env = environment()
    data_dir: Path | None = Path(a.data_dir).expanduser().resolve()
    if not (data_dir / "sst2").is_dir():
        log(f"no SST-2 at {data_dir / 'sst2'}: random token batches, and no run_trial / search rows")
        data_dir = None
    batches, data_line = load_batches(data_dir, dev)
    if data_dir is None:
        data_line += f" [looked in {Path(a.data_dir).expanduser().resolve()}]"
    settings = {"dry_run": dry, "forced_dry_run": forced_dry, "device": str(dev), "warmup": a.warmup,
                "steps": a.steps, "batch": BATCH, "batches": len(batches), "data": data_line,
                "backbones": backbones, "methods": a.methods, "time_limit_s": a.time_limit}
    report = Report(out, env, settings)

    print(f"# autopeft GPU check{' (DRY RUN on CPU)' if dry else ''}")
    if forced_dry:
        print("no CUDA device: running the dry run (CPU)")
    print(f"torch {env['torch']} (CUDA runtime {env.get('cuda_runtime') or '-'}); "
          + (f"GPU {env.get('cuda_device')} (sm {env.get('cuda_capability')}, {env.get('cuda_memory_gib')} GiB), "
             f"bf16 {'yes' if env.get('cuda_bf16') else 'no'}, TF32 matmul {'on' if env.get('tf32_matmul') else 'off'}"
             if cuda else "no CUDA device")
          + f"; CPU bf16 flags: {', '.join(env['cpu_bf16_flags']) or 'none'}; {env['cpus']} CPUs")
    print(f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}, transformers {env['transformers']}, "
          f"ray {env['ray']}, mlflow {env['mlflow']}; autopeft {env['autopeft']} (commit {env['git_commit']})")
    print(f"data: {data_line}")
    print(f"each step row: {a.warmup} warm-up + {a.steps} timed AdamW steps on {dev.type} (median ms); peak CUDA MiB: "
          "max_memory_allocated from the row's model build through its warm-up (the longest batch among them) less "
          "what was allocated before the build")
    print()
    report.start_table()

    search_planned = a.search and not dry and data_dir is not None
    reserve = SEARCH_RESERVE_S if search_planned else 0

    def out_of_time() -> bool:
        return time.perf_counter() - t_start > a.time_limit - reserve

    if cuda and not dry:  # CUDA context, cuBLAS handles: before the first row's baseline
        try:
            x = torch.randn(64, 64, device=dev, requires_grad=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16_ok):
                (x @ x).sum().backward()
            sync(dev)
        except Exception as exc:  # noqa: BLE001
            log(f"CUDA warm-up failed: {one_line(exc)}")

    run_methods = [m for m in a.methods if m in FAMILIES]
    for name in backbones:
        backbone = BACKBONES[name]
        for precision in precisions:
            why = None
            if name not in run_backbones:
                why = "dry run"
            elif precision == "bf16" and not bf16_ok:
                why = "no bf16 hardware" + (" (this CPU has neither AMX-BF16 nor AVX512-BF16)" if dry else "")
            if why:  # one row for the whole group
                listed = [*run_methods, *([PEFT_LORA] if a.peft and "lora" in run_methods else [])]
                row = Row(name, f"all {len(listed)} step rows", precision, device=dev.type).skip(why)
                row.extra["methods"] = listed
                report.add(row)
                continue
            try:
                step_rows(name, backbone, precision, run_methods, batches, dev, a, report, out_of_time)
            except Exception as exc:  # noqa: BLE001 - a bug in the loop itself: one row says so
                report.add(Row(name, "(step rows)", precision, device=dev.type).fail(exc))
    for m in a.methods:
        if m in SKIPPED_FAMILIES:
            report.add(Row("any", m, "any").skip(SKIPPED_FAMILIES[m]))

    first = backbones[0] if backbones else "minilm-l6"
    if a.trial:
        if out_of_time():
            report.add(Row(first, "run_trial (lora)", "auto", device=dev.type).skip("time limit"))
        else:
            report.add(trial_row(first, BACKBONES[first], data_dir, dev, a))
    if dry and "qlora" in a.methods:
        report.add(Row("minilm-l6", "qlora (NF4 on CUDA, paged AdamW)", "bf16", device="cuda").skip(
            "no CUDA" if not cuda else "dry run on CPU"))
    if a.search:
        left = a.time_limit - (time.perf_counter() - t_start)
        if not dry and left < 60:
            report.add(Row("minilm-l6", SEARCH_LABEL, "auto", device=dev.type).skip("time limit"))
        else:
            report.add(search_row(data_dir, dev, left))

    elapsed = time.perf_counter() - t_start
    report.write(done=True)
    counts = {s: sum(1 for r in report.rows if r.status == s) for s in ("ok", "failed", "not run")}
    print()
    print(f"rows: {counts['ok']} ok, {counts['failed']} failed, {counts['not run']} not run; "
          f"elapsed {elapsed:.0f} s; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
