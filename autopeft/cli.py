"""``autopeft`` command line: a thin layer over :mod:`autopeft.api`.

Bad input (budget, task, backbone, method, file) prints one ``error:`` line and exits with code 2
before anything starts; a failure during a run prints one line and exits with code 1.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from autopeft.errors import AutopeftError, first_line
from autopeft.searching.runs import RUNS_DIR


#: The click that parses the command line: typer >= 0.22 vendors its own (``typer._click``), older
#: typer uses the ``click`` package.
_click = getattr(typer.core, "_click", None) or __import__("click")


class _OneLineUsageErrors(TyperGroup):
    """Usage errors found by the option parser itself (a value out of range, an unknown option, a
    missing argument) as one ``error:`` line and exit 2, as every other bad input of the CLI, not
    click's boxed usage panel. ``--help`` and a bare ``autopeft`` still print the help."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click.exceptions.NoArgsIsHelpError as exc:  # a group without a command: its help
            exc.show()
            sys.exit(exc.exit_code)
        except _click.exceptions.ClickException as exc:
            where = f"; see `{exc.ctx.command_path} --help`" if getattr(exc, "ctx", None) is not None else ""
            msg = " ".join(exc.format_message().split()).rstrip(".")
            err.print(f"[bold red]error:[/] {escape(msg)}{escape(where)}",
                      markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("aborted", markup=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search, export and train parameter-efficient fine-tuning (PEFT) configurations.")
# Logs and CI capture output without a terminal; keep the Pareto table readable there too.
# soft_wrap: a long line (a folder path) is never broken in two; tables keep their own width.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140, soft_wrap=True)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200, soft_wrap=True)


#: Whether the CLI owns this process (the ``autopeft`` console script, :func:`main`), and so may
#: change how it answers signals while it exits; not when ``app`` runs inside another program
#: (a test's ``CliRunner``).
_OWN_PROCESS = False


class _UserError(AutopeftError):
    """Bad command-line input found by the CLI itself (exit 2)."""


def _fail(exc: BaseException, code: int) -> None:
    msg = first_line(exc)
    err.print(f"[bold red]error:[/] {escape(msg)}", markup=True, soft_wrap=True)  # a message's [..] is text
    raise typer.Exit(code)


def _run(fn, *args, **kwargs):
    """Call ``fn``; map user errors to exit 2 and other failures to one line and exit 1."""
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C; a search's SearchInterrupted also on SIGTERM: 128 + signal
        from autopeft.searching.interrupt import SearchInterrupted, exit_on_next_signal

        code = exc.exit_code if isinstance(exc, SearchInterrupted) else 130
        if _OWN_PROCESS:  # the process only exits now: a further Ctrl-C (in Ray's shut-down) ends it at once
            exit_on_next_signal(code)
        err.print(str(exc) if isinstance(exc, SearchInterrupted) else "interrupted", markup=False, soft_wrap=True)
        raise typer.Exit(code)
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        if isinstance(exc, (ValueError, FileNotFoundError)) or (isinstance(exc, AutopeftError) and exc.user_error):
            _fail(exc, 2)
        if os.environ.get("AUTOPEFT_DEBUG"):
            raise
        _fail(RuntimeError(f"{type(exc).__name__}: {exc}"), 1)


def _progress(msg: str) -> None:
    console.print(msg, markup=False, soft_wrap=True)


PRECISION_HELP = ("Compute precision: auto (bf16 on a CPU with AMX/AVX512-BF16 or a bf16 GPU, fp16 on older GPUs, "
                  "else fp32), fp32, bf16, fp16. Trainable weights stay float32.")


def _check_precision(precision: str | None) -> None:
    if precision is None:
        return
    from autopeft.backbones.precision import PRECISIONS

    if precision not in PRECISIONS:
        _fail(_UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"), 2)


def _parse_rung_eval_examples(value: str) -> int | None:
    """``--rung-eval-examples``: a positive count, or ``all`` (``None``: every dev example at every rung)."""
    v = value.strip().lower()
    if v == "all":
        return None
    if not (v.isascii() and v.isdigit()) or int(v) < 1:
        _fail(_UserError(f"--rung-eval-examples must be a positive number of examples or all, got {value!r}"), 2)
    return int(v)


@app.command()
def search(
    task: str = typer.Option("sst2", help="Task: a GLUE name (sst2, cola, mrpc, rte, stsb, wnli, qnli, qqp, mnli, mnli-mm), "
                             "superglue-boolq/-cb/-rte, a .csv/.tsv/.jsonl/.parquet file or folder, or hf:<dataset id>."),
    text_columns: Optional[str] = typer.Option(None, help="Text column(s) of your data: review, or premise,hypothesis (default text, sentence, or the pair sentence1,sentence2)."),
    label_column: Optional[str] = typer.Option(None, help="Label column of your data (default label); float labels make a regression task."),
    metric: Optional[str] = typer.Option(None, help="Metric to maximise: accuracy (default for classes), f1_macro, mcc; pearson, spearman for regression."),
    budget: str = typer.Option("0.5%", help="Trainable-parameter budget without the head: 0.5%, 0.005 or 120k."),
    backbone: str = typer.Option("minilm-l6", help="minilm-l6 (bundled), a Hugging Face id, or a local folder."),
    space: str = typer.Option("default", help="Search space: default, full, autopeft_paper, or a YAML path."),
    trials: Optional[int] = typer.Option(None, help="Trials to train (default 30 on CPU, 32 on GPU); over-budget or empty samples do not count."),
    max_train_examples: Optional[int] = typer.Option(None, help="Top fidelity in training examples (default 24000); lower it for a quick search."),
    time_budget: Optional[str] = typer.Option(None, help="Wall-clock cap: 1800, 30m, 2h, or none (default 26m on CPU, none on GPU)."),
    data_dir: Optional[str] = typer.Option(None, envvar="AUTOPEFT_DATA_DIR", help="Local GLUE folder (else the hub)."),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="MLflow URI (default sqlite:///mlflow.db)."),
    experiment: str = typer.Option("autopeft", help="MLflow experiment name."),
    name: Optional[str] = typer.Option(None, help="Search name (default <task>-<timestamp>)."),
    output_dir: str = typer.Option(RUNS_DIR, help="Where search folders go."),
    ray_address: Optional[str] = typer.Option(None, help="Existing Ray cluster: host:port of `ray start --head`, or auto (the "
                                               "cluster started on this machine); not ray:// (token authentication: see the "
                                               "README's cluster section)."),
    cpus_per_trial: Optional[float] = typer.Option(None, min=0.1, help="CPUs per trial (default: all cores on CPU; on GPUs the cores shared among the trials)."),
    gpus_per_trial: Optional[float] = typer.Option(None, min=0, help="GPUs per trial (default: as many trials per GPU as fit its memory, at most 8; 0.25 = four per GPU)."),
    seed: int = typer.Option(0, help="Seed of the sampler and of every trial."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size of the trials."),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    rung_eval_examples: Optional[str] = typer.Option(None, help="Dev examples scored at the rungs below the top (a seeded "
                                                     "sample, the same for every trial; default 500), or all. The top "
                                                     "rung always scores all of dev."),
    searcher: str = typer.Option("tpe", help="Sampler: tpe (multi-objective TPE), random, nsga2, qnehvi (BoTorch)."),
    one_shot: bool = typer.Option(False, "--one-shot/--no-one-shot",
                                  help="Train one gated model with every component first; add its best subsets as start points."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output: only the Pareto front (and errors)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted search --name (same options): finished "
                                "trials are kept, the running one is re-run, sampler and scheduler go on."),
    confirm_seeds: int = typer.Option(0, min=0, help="After the search, retrain each Pareto point with K more seeds; "
                                      "report mean ± std of its test scores."),
    reference: Optional[str] = typer.Option(None, help="full: also train full fine-tuning at the top fidelity on the "
                                            "same splits and show its test score beside the front."),
) -> None:
    """Search method choice and hyperparameters under a parameter budget; print the Pareto front.
    On a terminal, a live bar per running trial shows its examples seen, rung, loss and ETA."""
    from autopeft import api
    from autopeft.searching.budget import parse_budget

    b = _run(parse_budget, budget)
    for opt, value in (("--trials", trials), ("--max-train-examples", max_train_examples), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            _fail(_UserError(f"{opt} must be at least 1, got {value}"), 2)
    seconds = _run(_parse_duration, time_budget) if time_budget else None
    _check_precision(precision)
    training = {k: v for k, v in (("batch_size", batch_size), ("precision", precision)) if v}
    if rung_eval_examples is not None:
        training["rung_eval_examples"] = _parse_rung_eval_examples(rung_eval_examples)
    result = _run(api.search, task=task, budget=b, backbone=backbone, space=space, trials=trials,
                  time_budget_s=seconds, data_dir=data_dir, tracking_uri=tracking_uri, experiment=experiment,
                  name=name, output_dir=output_dir, ray_address=ray_address, cpus_per_trial=cpus_per_trial,
                  gpus_per_trial=gpus_per_trial, seed=seed, training=training or None,
                  max_train_examples=max_train_examples, searcher=searcher, one_shot=one_shot,
                  text_columns=text_columns, label_column=label_column, metric=metric,
                  progress=None if quiet else _live_progress(), resume=resume, confirm_seeds=confirm_seeds,
                  reference=reference)
    _print_front(result)


@app.command("resume")
def resume_search(
    search: str = typer.Argument(..., help="Name of the interrupted search under --output-dir, its folder, or latest."),
    output_dir: str = typer.Option(RUNS_DIR, help="Where search folders are."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output: only the Pareto front (and errors)."),
) -> None:
    """Continue an interrupted search with the options it was started with (its resume.json): finished
    trials are kept with their ids and scores, the trial that was running is re-run from the start."""
    from autopeft import api

    result = _run(api.resume, search, output_dir=output_dir, progress=None if quiet else _live_progress())
    _print_front(result)


def _live_progress():
    """Lines plus live per-trial bars on a terminal; lines only in logs and CI (no redraws there)."""
    from autopeft.searching.progress import LiveProgress

    return LiveProgress(console) if console.is_terminal else _progress


@app.command()
def status(
    search: str = typer.Argument("latest", help="Search folder, search name under --output-dir, or 'latest'."),
    output_dir: str = typer.Option(RUNS_DIR, help="Where search folders are."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """State of a running or finished search, from its folder: trials by status, best so far,
    elapsed time, running trials and their progress."""
    from autopeft.status import find_search_folder, format_status, search_status

    st = _run(lambda: search_status(find_search_folder(search, output_dir)))
    if as_json:
        print(json.dumps(st.as_dict(), default=str))
        return
    for line in format_status(st):
        console.print(line, markup=False, soft_wrap=True)


def _bytes(n: int) -> str:
    """``n`` bytes in GiB (from 1 GiB) or MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _parse_duration(text: str) -> float:
    s = text.strip().lower()
    if s in ("none", "inf"):
        return math.inf  # no cap
    mult = {"s": 1, "m": 60, "h": 3600}.get(s[-1:], None)
    try:
        value = float(s[:-1]) * mult if mult else float(s)
    except ValueError:
        raise _UserError(f"invalid time budget {text!r}: use seconds (1800), 30m / 2h, or none") from None
    if not 0 < value < math.inf:
        raise _UserError(f"invalid time budget {text!r}: it must be positive")
    return value


def _print_front(result) -> None:
    from autopeft.data.tasks import get_task

    metric = get_task(result.settings["task"]).metric
    splits = result.settings.get("splits") or {}
    caption = (f"{metric} [95% interval]. dev: {splits['dev']:,} examples carved from train, read by every search "
               f"decision; test: {splits['test']:,} examples ({splits.get('test_source', 'validation')}), read once "
               "after the search: quote the test score" if splits else None)
    table = Table(title=f"Pareto front at {result.fidelity:,} training examples "
                        f"(budget {result.settings['budget']} = {result.param_limit:,} parameters)",
                  caption=caption, caption_justify="left")
    confirm = any(r.get("confirm") for r in result.pareto)
    cols = ("#", "trial", "dev", "test", *(("test mean ± std (seeds)",) if confirm else ()),
            "params", "%", "MiB", "methods")
    for col in cols:  # scores never wrap or shorten; the methods column folds instead
        table.add_column(col, justify="right" if col not in ("trial", "methods") else "left",
                         no_wrap=col != "methods", overflow="fold")
    if not result.pareto:
        console.print(f"Pareto front at {result.fidelity:,} training examples: empty (no trial reached it within budget)",
                      markup=False)
    for i, row in enumerate(result.pareto):
        comps = (row.get("recipe") or {}).get("components", [])
        methods = " + ".join(c["method"] for c in comps) or "head only"
        if (row.get("recipe") or {}).get("gating"):
            methods += " (gated)"
        c = row.get("confirm") or {}
        seeds = ((f"{c['test_mean']:.4f} ± {c['test_std']:.4f} ({len(c['seeds'])})" if c.get("test_mean") is not None
                  else "n/a"),) if confirm else ()
        table.add_row(str(i), row["trial_id"], _fmt_ci(row, "score"), _fmt_ci(row, "test"), *seeds,
                      f"{row['trainable_params']:,}", f"{row['trainable_percent']:.3f}",
                      f"{row['peak_memory_bytes'] / 2**20:.0f}", methods)
    if result.pareto:
        console.print(table)
    ref = getattr(result, "reference", None)
    if ref and ref.get("status") == "failed":
        console.print(f"reference: {ref['kind']} fine-tuning failed: {ref.get('error')}", markup=False)
    elif ref:
        console.print(f"reference: {ref['kind']} fine-tuning ({ref['trainable_params']:,} parameters): dev "
                      f"{_fmt_ci(ref, 'score')}, test {_fmt_ci(ref, 'test')}", markup=False)
    counts = {}
    for t in result.trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    cut = [t for t in result.trials if t.get("cut")]
    where = ", ".join(f"{t['cut']['examples_seen']:,}" for t in cut)
    cut_note = f" ({len(cut)} cut by the time budget, at {where} examples)" if cut else ""
    console.print(f"trials: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}{cut_note}; "
                  f"hypervolume {result.hypervolume:.4f}; {result.wall_time_s / 60:.1f} min", markup=False)
    console.print(f"results: {result.path}  (MLflow parent run {result.mlflow_run_id})", markup=False)
    if result.pareto:
        console.print(f"next: autopeft export {result.path} --pick best -o best.yaml", markup=False)
    else:
        console.print(empty_front_advice(result), markup=False, soft_wrap=True)


def _fmt_ci(row: dict, key: str) -> str:
    """``0.8761 [0.8541, 0.8968]`` from ``row[key]`` and its interval (``score_low``/``score_high`` for
    ``score``, ``test_low``/``test_high`` for ``test``); ``n/a`` without a score."""
    from autopeft.data.uncertainty import fmt_ci

    return fmt_ci(row.get("score" if key == "score" else "test_score"), row.get(f"{key}_low"), row.get(f"{key}_high"))


#: Statuses of samples that were rejected before training (see :data:`autopeft.searching.tracking.STATUSES`).
_REJECTED = ("over_budget", "empty", "invalid")


def empty_front_advice(result, smallest: tuple[str, int] | None = None) -> str:
    """The one line printed under an empty Pareto front: the cause, read from the trials' statuses.

    * every sample rejected, some over the budget (``result.param_limit``): the budget is the cause;
      names the smallest configuration of the space and its count (``smallest``, else computed with
      :meth:`autopeft.searching.space.SearchSpace.smallest_point` from ``result.settings``);
    * every sample rejected otherwise (invalid recipes, no PEFT component), or every trained trial
      failed: says so, with the first reason;
    * no trial at all: the time budget ran out first;
    * otherwise trials trained but none reached the top fidelity: more time or a lower fidelity.

    Args:
        result: an :class:`autopeft.api.SearchResult` (``trials`` with ``status``/``error``,
            ``param_limit``, ``fidelity``, ``path``, ``settings``).
        smallest: ``(summary, trainable_params)`` of the space's smallest configuration.
    """
    statuses = [t.get("status") for t in result.trials]
    counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    limit = result.param_limit
    trained = [t for t in result.trials if t.get("status") not in (*_REJECTED, "duplicate")]  # never trained
    where = f"see {Path(result.path) / 'trials.json'}"

    def first_error(trials) -> str:
        err = next((line for t in trials if (line := first_line(t.get("error") or ""))), "")
        return f" (first: {err[:200]}{'…' if len(err) > 200 else ''})" if err else ""

    if not statuses:
        return "no trial ran within the time budget: raise --time-budget"
    if not trained and counts.get("over_budget"):
        others = [f"{counts[s]} {label}" for s, label in (("invalid", "invalid"), ("empty", "without a PEFT component"))
                  if counts.get(s)]
        head = (f"every sampled configuration exceeded the budget of {limit:,} parameters" if not others else
                f"no sampled configuration fit the budget of {limit:,} parameters ({counts['over_budget']} over it, "
                f"{', '.join(others)})")
        if smallest is None:
            smallest = _smallest_configuration(result)
        if smallest is None:
            return f"{head}: raise --budget"
        summary, m = smallest
        if m > limit:
            return (f"{head}; the smallest configuration of this space, {summary}, has {m:,} trainable parameters: "
                    f"raise --budget to at least {m:,} (--budget {m})")
        return (f"{head}; the smallest configuration of this space, {summary}, has {m:,} trainable parameters, "
                f"within it: sample more configurations (--trials)")
    if not trained:
        rejected = ", ".join(f"{v} {k}" for k, v in counts.items())
        return f"every sampled configuration was rejected before training ({rejected}){first_error(result.trials)}; {where}"
    if all(t.get("status") == "failed" for t in trained):
        return f"every trained trial failed{first_error(trained)}; {where}"
    return (f"no trial reached {result.fidelity:,} training examples within budget: raise --time-budget "
            "or lower --max-train-examples")


def _smallest_configuration(result) -> tuple[str, int] | None:
    """``(summary, trainable_params)`` of the smallest configuration of the search's space, or ``None``
    when it cannot be computed (the space file or the backbone is gone)."""
    from autopeft.searching.space import SearchSpace

    s = result.settings or {}
    try:
        space = SearchSpace.load(s.get("space_source") or s.get("space") or "default")
        base = {"backbone": s.get("backbone", "minilm-l6"), "task": s.get("task", "sst2"),
                "training": dict(s.get("training") or {})}
        point, n = space.smallest_point(base)
        return space.describe_point(point), n
    except Exception:  # noqa: BLE001 - advice only: fall back to the sentence without the numbers
        return None


@app.command()
def export(
    search: str = typer.Argument(..., help="Search folder, search name under --output-dir, 'latest', or a folder "
                                           "written by autopeft train (for --format peft / --merge)."),
    pick: Optional[str] = typer.Option(None, help="best (default: highest dev score), smallest, leanest (least memory), "
                                       "smallest-within-noise (fewest parameters within the best's dev interval), "
                                       "an index into the front, or a trial id."),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="Recipe file to write (default best.yaml), or the folder for --format peft / --merge."),
    output_dir: str = typer.Option(RUNS_DIR, help="Where search folders are."),
    fmt: Optional[str] = typer.Option(None, "--format", help="recipe (default: autopeft's YAML), peft (a Hugging Face "
                                                                 "peft adapter folder) or merged (same as --merge)."),
    merge: bool = typer.Option(False, "--merge", help="Write a plain transformers model with LoRA/AdaLoRA/BitFit merged in."),
    data_dir: Optional[str] = typer.Option(None, envvar="AUTOPEFT_DATA_DIR",
                                           help="GLUE folder for training a search point first (default: the search's)."),
    train: bool = typer.Option(True, "--train/--no-train",
                               help="peft/merged from a search: train the point first when it has no trained weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing recipe file or non-empty output folder "
                                                                 "(never the search or model being exported)."),
) -> None:
    """Write one Pareto point as a training recipe, a peft adapter folder (--format peft) or a merged model (--merge).

    Folders need trained weights: a folder written by autopeft train, or a search point, whose weights the search kept (<search>/trained/<trial id>/; searches from before weights were kept: trained first, deterministic).
    """
    from autopeft import api
    from autopeft.exporting.exporters import EXPORT_FORMATS

    if fmt is not None and fmt not in EXPORT_FORMATS:
        _fail(_UserError(f"unknown --format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}"), 2)
    if merge and fmt is not None and not EXPORT_FORMATS[fmt].folder:
        _fail(_UserError(f"--merge writes a model folder, not a {fmt}: drop --format {fmt}"), 2)
    form = EXPORT_FORMATS["merged" if merge else fmt or "recipe"]
    if not form.folder:
        recipe = _run(api.export, search, pick=pick or "best", output=output or Path("best.yaml"),
                      output_dir=output_dir, fmt=form.name, overwrite=overwrite)
        methods = ", ".join(c.method for c in recipe.components) or "head only"
        console.print(f"wrote {output or 'best.yaml'} ({methods}; {recipe.training.max_train_examples:,} training examples)",
                      markup=False)
        return
    res = _run(api.export, search, pick=pick, output=output, output_dir=output_dir, fmt=form.name, data_dir=data_dir,
               train=train, overwrite=overwrite, log=_progress)
    methods = ", ".join(c.method for c in res.recipe.components)
    console.print(f"wrote {res.path} ({form.writes}: {methods}; logits within {res.max_abs_diff:.1e} of autopeft's "
                  f"model; model card README.md)", markup=False)
    for note in res.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)


@app.command()
def train(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML (e.g. from autopeft export)."),
    data_dir: Optional[str] = typer.Option(None, envvar="AUTOPEFT_DATA_DIR", help="Local GLUE folder (else the hub)."),
    output_dir: Optional[Path] = typer.Option(None, "-o", "--output-dir", help="Where to save the trained PEFT weights (default outputs/<recipe name>)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: CUDA if available)."),
    cpus: Optional[int] = typer.Option(None, help="CPU threads to compute on (default: every CPU available)."),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP + " Default: the recipe's."),
) -> None:
    """Train a recipe, report its scores, and save the trained PEFT weights. A recipe from a search (with
    dev) reports its dev score, as the search scored it, and its test score, read once after training."""
    from autopeft import api
    from autopeft.composition.recipe import load_recipe
    from autopeft.data.tasks import get_task

    if cpus is not None and cpus < 1:
        _fail(_UserError(f"--cpus must be at least 1, got {cpus}"), 2)
    if cpus is not None and cpus > (os.cpu_count() or 1):  # as search's --cpus-per-trial (was: 999 threads on 2 CPUs)
        _fail(_UserError(f"--cpus {cpus} exceeds this machine's {os.cpu_count() or 1} CPUs"), 2)
    _check_precision(precision)
    r = _run(load_recipe, recipe)
    if precision:
        r = r.model_copy(update={"training": r.training.model_copy(update={"precision": precision})})
    out = output_dir or Path("outputs") / recipe.stem
    result = _run(api.train, r, data_dir=data_dir, output_dir=out, device=device, log=_progress, cpus=cpus)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    name = get_task(r.task).name
    if result.eval_split == "dev":  # a recipe from a search: dev as the search scored it, then test, once
        test = ", ".join(f"{k}={v:.4f}" for k, v in (result.test_metrics or {}).items())
        scores = (f"dev ({result.eval_examples:,} examples carved from train): {metrics} "
                  f"[95% {result.score_low:.4f}, {result.score_high:.4f}]; test ({result.test_examples:,}): {test} "
                  f"[95% {result.test_low:.4f}, {result.test_high:.4f}]")
    else:
        scores = f"validation: {metrics} [95% {result.score_low:.4f}, {result.score_high:.4f}]"
    console.print(f"{name} {scores}; trainable {result.trainable_params:,} "
                  f"({result.trainable_percent:.3f}%), peak memory {result.peak_memory_bytes / 2**20:.0f} MiB, "
                  f"{result.train_time_s:.0f}s training on {result.threads} thread{'s' if result.threads != 1 else ''}",
                  markup=False)
    console.print(f"saved to {out}", markup=False)


@app.command()
def predict(
    trained: Path = typer.Argument(..., help="A trained output folder (autopeft train -o)."),
    texts: Optional[list[str]] = typer.Argument(None, help="Texts to classify (single-text tasks)."),
    input_file: Optional[Path] = typer.Option(None, "--input", "-i", help="A .csv/.tsv/.jsonl/.parquet file with the recipe's text column(s)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the texts and their predictions here (CSV) instead of printing them."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
) -> None:
    """Predict labels with a trained output: one per line, as the labels of the training data."""
    from autopeft import api
    from autopeft.composition.recipe import load_recipe
    from autopeft.data.tasks import get_task
    from autopeft.data.userdata import read_texts

    if bool(texts) == (input_file is not None):
        _fail(_UserError("give either texts or --input FILE"), 2)
    if not (trained / "recipe.yaml").is_file():
        _fail(_UserError(f"{str(trained)!r} is not a trained output (no recipe.yaml; see autopeft train -o)"), 2)
    if output is not None and output.is_dir():  # checked before predicting: no predictions thrown away
        _fail(_UserError(f"-o {str(output)!r} is a folder: give the CSV file to write"), 2)
    if output is not None and input_file is not None and output.resolve() == input_file.resolve():
        _fail(_UserError(f"-o {str(output)!r} is the --input file: writing there would replace its data; "
                         "give another file"), 2)
    task = _run(lambda: get_task(load_recipe(trained / "recipe.yaml").task))
    if input_file is not None:
        rows = _run(read_texts, input_file, task.text_columns)
    elif len(task.text_columns) > 1:
        _fail(_UserError(f"{task.name} reads text pairs ({', '.join(task.text_columns)}): use --input FILE"), 2)
    else:
        rows = [(t,) for t in texts]
    if not rows:
        _fail(_UserError(f"{input_file} has no rows to predict"), 2)
    preds = _run(api.predict, trained, rows, device=device)
    if output is not None:
        import csv

        def write() -> None:
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow([*task.text_columns, "prediction"])
                w.writerows([*row, p] for row, p in zip(rows, preds))

        _run(write)  # an unwritable place: one line, not a traceback
        console.print(f"wrote {len(preds)} predictions to {output}", markup=False)
    else:
        for p in preds:
            print(p)


@app.command()
def count(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Trainable parameters of a recipe (without the task head), the head, and the backbone's weight bytes in
    fp32, bf16 and nf4, without training."""
    from autopeft import api

    c = _run(api.count, recipe)
    if as_json:
        print(json.dumps(c.as_dict()))
    else:
        console.print(f"trainable {c.trainable_params:,} ({c.trainable_percent:.4f}% of {c.backbone_params:,}); "
                      f"head {c.head_params:,} (reads {c.pooling} pooling; outside the budget)", markup=False)
        if c.weight_bytes:
            console.print("backbone weights: " + ", ".join(f"{k} {_bytes(v)}" for k, v in c.weight_bytes.items()),
                          markup=False)


fusion_app = typer.Typer(cls=_OneLineUsageErrors, no_args_is_help=True, help="AdapterFusion in two stages: per-task adapters, then fusion.")
app.add_typer(fusion_app, name="fusion")


@fusion_app.command("stage1")
def fusion_stage1(
    tasks: list[str] = typer.Argument(..., help="Source tasks, e.g. sst2 mrpc rte."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Base recipe (backbone, training, adapter)."),
    output_dir: Path = typer.Option(Path("adapters"), "-o", "--output-dir", help="One folder per task goes here."),
    data_dir: Optional[str] = typer.Option(None, envvar="AUTOPEFT_DATA_DIR", help="Local GLUE folder (else the hub)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
) -> None:
    """Stage 1: train and save one adapter per source task."""
    from autopeft.training.fusion import train_adapters
    from autopeft.data.tasks import get_task

    for t in tasks:
        _run(get_task, t)
    folders = _run(train_adapters, tasks, recipe, output_dir, data_dir, device=device, log=_progress)
    console.print("stage-1 adapters: " + " ".join(str(f) for f in folders), markup=False)


@fusion_app.command("stage2")
def fusion_stage2(
    adapters: list[Path] = typer.Argument(..., help="Stage-1 adapter folders."),
    task: str = typer.Option(..., help="Target task."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Base recipe (training settings, extra components)."),
    output_dir: Path = typer.Option(Path("outputs/fusion"), "-o", "--output-dir", help="Where the fusion model goes."),
    data_dir: Optional[str] = typer.Option(None, envvar="AUTOPEFT_DATA_DIR", help="Local GLUE folder (else the hub)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
) -> None:
    """Stage 2: freeze the stage-1 adapters and train fusion attention over them on the target task."""
    from autopeft.training.fusion import train_fusion
    from autopeft.data.tasks import get_task

    _run(get_task, task)
    result, out = _run(train_fusion, adapters, task, output_dir, data_dir, base_recipe=recipe, device=device, log=_progress)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    console.print(f"{task} validation: {metrics}; saved to {out}", markup=False)


@app.command()
def methods() -> None:
    """List the available PEFT methods and their papers."""
    from autopeft.methods import available_methods, get_method

    for name in available_methods():
        console.print(f"{name:15s} {get_method(name).paper}", markup=False)


@app.command()
def ui(
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="MLflow URI (default sqlite:///mlflow.db)."),
    port: int = typer.Option(5000, help="Port."),
    host: str = typer.Option("127.0.0.1", help="Host."),
    workers: int = typer.Option(1, min=1, help="Server worker processes."),
) -> None:
    """Open the MLflow UI on the search store (``mlflow ui --backend-store-uri ...``); prints the
    addresses of the searches' runs views. SIGTERM / Ctrl-C stop the server and all its workers."""
    from autopeft.searching.tracking import default_tracking_uri
    from autopeft.ui import serve, server_command, view_urls

    uri = tracking_uri or default_tracking_uri()
    base = f"http://{host}:{port}"
    console.print(f"MLflow UI on {base} for {uri}", markup=False)
    for what, url in view_urls(uri, base):
        console.print(f"  {what}: {url}", markup=False, soft_wrap=True)
    raise typer.Exit(serve(server_command(uri, host, port, workers)))


def main() -> None:
    """Console-script entry point."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:  # piped help: rich would cut cells at 80
        import typer.rich_utils

        typer.rich_utils.MAX_WIDTH = 120
    app()


if __name__ == "__main__":
    main()
