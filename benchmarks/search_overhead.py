"""Where a search's wall time goes, and is a trial inside the search as fast as the same trial alone?

Runs, in one process tree, the way a user runs them:

1. ``autopeft search`` through the CLI (a subprocess: Ray, MLflow, the progress lines, the front
   scored on test), by default the README's command 1 with a shorter fidelity; ``--default`` runs
   the default search itself (the 26-minute cap);
2. the search's first trial (the default space's first start point) again, alone, through
   :func:`autopeft.training.trainer.run_trial` in this process, on the same threads, to the same
   examples, with the same schedule, twice after the search (the first warms the token and file
   caches; the faster is compared). Alone it is scored once, at the end; in the search at every rung,
   so the wall-time ratio includes those evaluations and the training-time ratio is the like-for-like one.

It prints one table: the search's wall time split into training, the trials' setup and evaluation,
Ray's start, the driver's preparation and finish, and the rest (Ray Tune's loop, MLflow, the
searcher, gaps between trials); the outside-training share (issue 16's target: at most 10% of the
default run); and the in-search/alone ratio of the first trial's training time (target at most
1.05x) and of its wall time.

    python benchmarks/search_overhead.py --data-dir ../shared/data/glue [--max-train-examples 8000]
        [--trials 3] [--default] [--repeats K] [--json out.json]

``--repeats K`` runs the pair K times interleaved (search, alone, search, alone, ...; one warm-up run
alone first) and prints every pair's ratio and their median: two runs of the same recipe alone differ
by up to 9% on this machine, so one pair cannot tell 1.05x from 1.15x. The wall-time table is the
first search's. ``--repeats 0`` runs the search alone: the wall-time table only (``--default --repeats 0``:
the default run's outside-training share, issue 16's target, in 27 minutes instead of 34).

Run it on a quiet machine: anything else on the cores slows the search and the trial alone unequally.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def alone(recipe: dict, examples: int, threads: int, data_dir: str) -> dict:
    """The first trial's recipe trained alone to ``examples`` (its schedule unchanged) on ``threads``."""
    import torch

    from autopeft.composition.recipe import recipe_from_dict
    from autopeft.training.trainer import run_trial

    torch.set_num_threads(threads)
    data = json.loads(json.dumps(recipe))
    tr = data["training"]
    tr["schedule_examples"] = tr.get("schedule_examples") or tr["max_train_examples"]
    tr["max_train_examples"] = examples
    t0 = time.perf_counter()
    result, _ = run_trial(recipe_from_dict(data), data_dir)
    return {"train_time_s": result.train_time_s, "setup_time_s": result.setup_time_s,
            "eval_time_s": result.eval_time_s, "wall_time_s": time.perf_counter() - t0, "score": result.score,
            "examples_seen": result.examples_seen}


def wall_parts(spent: dict, trials: list) -> list[tuple[str, float]]:
    """``(part, seconds)`` of a search's wall time, from its result.json ``time_s`` and trials.json.

    A trial the time cap cut (``cut`` in trials.json: where its progress file left it) trained on after
    its last rung row; that training is inside the trials' wall time, not the Tune loop's."""
    trial_walls = sum(t["rows"][-1]["wall_time_s"] for t in trials if t.get("rows"))
    trial_walls += sum(t["cut"]["train_time_s"] - (t["rows"][-1]["train_time_s"] if t.get("rows") else 0.0)
                       for t in trials if t.get("cut"))
    return [
        ("training steps (every trial)", spent["training_s"]),
        ("trial setup: data, model build, optimiser", spent["trial_setup_s"]),
        ("trial evaluation on dev at each rung", spent["trial_eval_s"]),
        ("trial other (saving the top-rung weights, reports)",
         trial_walls - spent["training_s"] - spent["trial_setup_s"] - spent["trial_eval_s"]),
        ("driver: settings, splits, MLflow parent, start points", spent["prepare_s"]),
        ("Ray start", spent["ray_start_s"]),
        ("Ray Tune loop outside trials (scheduling, MLflow, searcher, worker start)", spent["tune_s"] - trial_walls),
        ("driver finish: front scored on test, files, MLflow", spent["finish_s"]),
    ]


def print_table(cmd: list[str], spent: dict, trials: list, call_s: float, parts: list[tuple[str, float]]) -> None:
    """The wall-time table: each part's seconds and share, and the outside-training share."""
    wall = spent["wall_s"]
    print(f"search: {' '.join(cmd[3:])}")
    print(f"  {sum(1 for t in trials if t.get('rows'))} trials trained, wall {wall:.1f} s "
          f"(the CLI process: {call_s:.1f} s, Python start and imports included)\n")
    print("| where the search's wall time went | seconds | share of wall |\n|---|---:|---:|")
    for name, sec in parts:
        print(f"| {name} | {sec:.1f} | {sec / wall:.1%} |")
    print(f"| **outside training** | {wall - spent['training_s']:.1f} | **{spent['outside_training_share']:.1%}** "
          f"(target <= 10%) |\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
    ap.add_argument("--max-train-examples", type=int, default=8000, help="the search's top fidelity")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--default", action="store_true",
                    help="the default search (README command 1: default fidelity, trials and 26-minute cap)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved (search, alone) pairs; the ratio printed is their median; 0: the search "
                         "only (its wall-time table, no trial alone)")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args()
    if args.repeats < 0:
        ap.error("--repeats must be at least 0")
    data_dir = os.path.abspath(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="autopeft-overhead-"))
    cmd = [sys.executable, "-m", "autopeft", "search", "--task", "sst2", "--budget", "0.5%", "--data-dir", data_dir,
           "--output-dir", str(work / "runs"), "--name", "overhead", "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    if not args.default:
        cmd += ["--trials", str(args.trials), "--max-train-examples", str(args.max_train_examples)]

    def search(k: int) -> tuple[dict, list, float]:
        """One ``autopeft search`` through the CLI: ``(time_s, trials, CLI call seconds)``."""
        run_cmd = [c if c != "overhead" else f"overhead-{k}" for c in cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(run_cmd, capture_output=True, text=True)
        call = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"error: the search exited {proc.returncode}")
        folder = work / "runs" / f"overhead-{k}"
        return (json.loads((folder / "result.json").read_text())["time_s"],
                json.loads((folder / "trials.json").read_text()), call)

    if args.repeats == 0:
        spent, trials, call_s = search(0)
        parts = wall_parts(spent, trials)
        print_table(cmd, spent, trials, call_s, parts)
        print(f"search folder: {work / 'runs' / 'overhead-0'}")
        if args.json:
            Path(args.json).write_text(json.dumps({"command": cmd[3:], "time_s": spent, "cli_call_s": call_s,
                                                   "parts": dict(parts)}, indent=2))
        return 0
    pairs = []  # (in-search row, alone run) per repeat
    spent = trials = None
    runs: list[dict] = []
    for k in range(args.repeats):
        spent_k, trials_k, call_k = search(k)
        first = next(t for t in trials_k if t.get("rows"))
        row = first["rows"][-1]
        if k == 0:
            spent, trials, call_s, first0 = spent_k, trials_k, call_k, first
            # the trial alone before the first search would run cold (token and file caches): the
            # first alone run comes after it and only warms them when repeats interleave
            if args.repeats > 1:
                runs.append(alone(first["recipe"], row["examples_seen"], int(row["threads"]), data_dir))
        solo_k = alone(first["recipe"], row["examples_seen"], int(row["threads"]), data_dir)
        runs.append(solo_k)
        pairs.append((row, solo_k))
    if args.repeats == 1:  # the single-pair form: a second alone run, the faster of the two compared
        runs.append(alone(first0["recipe"], pairs[0][0]["examples_seen"], int(pairs[0][0]["threads"]), data_dir))
        pairs[0] = (pairs[0][0], min(runs, key=lambda r: r["train_time_s"]))
    first = first0
    row, solo = pairs[0]
    ratios = [r["train_time_s"] / a["train_time_s"] for r, a in pairs]
    ratio_train = statistics.median(ratios)
    ratio_wall = statistics.median(r["wall_time_s"] / a["wall_time_s"] for r, a in pairs)

    parts = wall_parts(spent, trials)
    print_table(cmd, spent, trials, call_s, parts)
    print(f"first trial ({first['trial_id']}, {row['examples_seen']:,} examples, {int(row['threads'])} threads): "
          f"training {row['train_time_s']:.1f} s in the search vs {solo['train_time_s']:.1f} s alone "
          f"(alone runs: {', '.join(format(r['train_time_s'], '.1f') for r in runs)} s) -> in-search/alone "
          f"**{ratios[0]:.3f}x** (target <= 1.05x); wall {row['wall_time_s']:.1f} vs {solo['wall_time_s']:.1f} s "
          f"-> {row['wall_time_s'] / solo['wall_time_s']:.3f}x; dev score {row['score']:.4f} in the search, {solo['score']:.4f} alone")
    if len(pairs) > 1:
        print(f"{len(pairs)} interleaved pairs (search, then alone): training in search / alone = "
              + ", ".join(f"{r['train_time_s']:.1f}/{a['train_time_s']:.1f} s = {x:.3f}x"
                          for (r, a), x in zip(pairs, ratios))
              + f"; median **{ratio_train:.3f}x** (target <= 1.05x; the line above is the first pair), "
              f"wall median {ratio_wall:.3f}x")
    out = {"command": cmd[3:], "time_s": spent, "cli_call_s": call_s, "parts": dict(parts),
           "first_trial": {"in_search": {k: row[k] for k in ("train_time_s", "setup_time_s", "eval_time_s",
                                                             "wall_time_s", "score", "examples_seen", "threads")},
                           "alone": runs, "ratio_train": ratio_train, "ratio_wall": ratio_wall,
                           "pairs": [{"in_search_train_s": r["train_time_s"], "alone_train_s": a["train_time_s"],
                                      "ratio_train": x} for (r, a), x in zip(pairs, ratios)]}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
