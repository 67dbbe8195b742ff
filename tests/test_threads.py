"""A trial computes on as many threads as the CPUs it was given (issue 14, case 2; ray-project/ray#28594).

Nothing set a trial's thread count: with ``--cpus-per-trial 1`` two trials ran side by side on two
cores, each with PyTorch's default inter-op pool of one thread per core (Ray's ``OMP_NUM_THREADS``
only reaches the intra-op pool), and ``autopeft train`` had no say at all. Each trial now sizes
PyTorch's intra-op and inter-op pools (and OpenMP / MKL) from its Ray resources, ``autopeft train``
from ``--cpus``; every rung row records what the trial computed on, read inside the trial.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from test_resume import SPACE, TINY_BERT, _data, _env


@pytest.mark.integration
def test_every_trial_computes_on_the_cpus_ray_gave_it(tmp_path):
    glue = _data(tmp_path)
    (tmp_path / "space.yaml").write_text(SPACE)
    args = {"task": "sst2", "budget": "1500", "backbone": TINY_BERT, "space": str(tmp_path / "space.yaml"),
            "trials": 2, "data_dir": str(glue), "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "name": "threads",
            "output_dir": str(tmp_path / "runs"), "seed": 3, "cpus_per_trial": 1,
            "training": {"max_eval_examples": 48}, "max_train_examples": 128, "time_budget_s": 600}
    runner = "import json, sys\nfrom autopeft.api import search\nsearch(**json.loads(sys.argv[1]), progress=print)"
    res = subprocess.run([sys.executable, "-c", runner, json.dumps(args)], env=_env(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    side_by_side = os.cpu_count() or 1  # the local Ray instance has every core: trials run side by side
    assert f"1 CPU / 0 GPU per trial, {side_by_side} at a time" in res.stdout
    trials = [t for t in json.loads((tmp_path / "runs" / "threads" / "trials.json").read_text())
              if t["trial_id"].startswith("trial_")]
    rows = [r for t in trials for r in t["rows"]]
    assert len(trials) == 2 and rows
    # read by torch.get_num_threads() / get_num_interop_threads() inside each trial, at each rung:
    # was 1 and 2 (Ray's OMP_NUM_THREADS=1, PyTorch's inter-op pool one per core)
    assert [(r["threads"], r["interop_threads"]) for r in rows] == [(1, 1)] * len(rows)


def _in_fresh_process(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_limit_threads_sets_both_pools_and_the_native_libraries_once_per_process():
    got = _in_fresh_process(
        "import json, os, torch\nfrom autopeft.backbones.threads import limit_threads\n"
        "first = limit_threads(3)\n"
        "torch.ones(64, 64) @ torch.ones(64, 64)\n"
        "torch.jit.wait(torch.jit.fork(torch.add, torch.ones(2), 1))  # the inter-op pool runs\n"
        "second = limit_threads(1)  # inter-op can no longer change: kept, no error\n"
        "print(json.dumps({'first': first, 'second': second, 'omp': os.environ['OMP_NUM_THREADS'],"
        " 'rayon': os.environ['RAYON_NUM_THREADS']}))")
    assert got == {"first": {"threads": 3, "interop_threads": 3}, "second": {"threads": 1, "interop_threads": 3},
                   "omp": "1", "rayon": "1"}


@pytest.mark.integration
def test_autopeft_train_computes_on_cpus_threads(tmp_path):
    glue = _data(tmp_path)
    recipe = {"backbone": TINY_BERT, "task": "sst2",
              "components": [{"method": "lora", "r": 2, "target_modules": ["query", "value"]}],
              "training": {"max_train_examples": 32, "batch_size": 16, "max_eval_examples": 16, "max_seq_length": 16}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cli = "from autopeft.cli import main; main()"
    for cpus in sorted({1, min(2, os.cpu_count() or 1)}):  # --cpus above the machine's CPUs is refused
        out = tmp_path / f"out{cpus}"
        res = subprocess.run([sys.executable, "-c", cli, "train", "-r", str(tmp_path / "r.yaml"),
                              "--data-dir", str(glue), "-o", str(out), "--cpus", str(cpus)],
                             env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert (metrics["threads"], metrics["interop_threads"]) == (cpus, cpus)
        assert f"training on {cpus} thread" in res.stdout
    res = subprocess.run([sys.executable, "-c", cli, "train", "-r", str(tmp_path / "r.yaml"), "--cpus", "0"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == "error: --cpus must be at least 1, got 0", res.stderr
    many = (os.cpu_count() or 1) + 1  # was: trained on more threads than CPUs, only slower
    res = subprocess.run([sys.executable, "-c", cli, "train", "-r", str(tmp_path / "r.yaml"), "--cpus", str(many)],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == (f"error: --cpus {many} exceeds this machine's "
                                                          f"{os.cpu_count() or 1} CPUs"), res.stderr
    from autopeft import api

    for bad in (0, many, 1.5):
        with pytest.raises(ValueError, match=rf"^cpus must be a whole number from 1 to this machine's \d+ CPUs, got {bad}$"):
            api.train(tmp_path / "r.yaml", cpus=bad)


def test_a_local_search_runs_its_trials_at_the_drivers_priority():
    """Ray starts workers at nice 15 by default: trials then ran below the driver, its progress
    display, MLflow and Ray's own processes (1.2x slower in a search than alone)."""
    code = ("import os, ray\n"
            "from autopeft.searching.tune import start_ray\n"
            "start_ray(None)\n"
            "@ray.remote(num_cpus=1)\n"
            "class Trial:\n"
            "    def nice(self):\n"
            "        return os.nice(0)\n"
            "print('NICE', os.nice(0), ray.get(Trial.remote().nice.remote()))\n"
            "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("NICE")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    driver, trial = map(int, lines[0].split()[1:])
    assert trial == driver
