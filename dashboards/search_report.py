"""Render one search from the MLflow store as a single HTML page: the Pareto front, every trial with
its status and per-rung dev scores (with how many dev examples each read), and the front's plot.

MLflow's own pages show runs one at a time; this puts a whole search side by side.

    python dashboards/search_report.py [--tracking-uri sqlite:///mlflow.db] [--run PARENT_RUN_ID] [-o report.html]

Without ``--run`` it takes the most recent search of the experiment.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
import tempfile
from pathlib import Path


def build_report(tracking_uri: str, experiment: str = "autopeft", run_id: str | None = None) -> str:
    """HTML of one search (raises ``LookupError`` if the store holds none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no experiment {experiment!r} in {tracking_uri}")
    if run_id is None:
        parents = client.search_runs([exp.experiment_id], "tags.`autopeft.kind` = 'search'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise LookupError(f"no search in experiment {experiment!r}")
        run_id = parents[0].info.run_id
    parent = client.get_run(run_id)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    with tempfile.TemporaryDirectory() as tmp:
        front = json.loads(Path(client.download_artifacts(run_id, "pareto.json", tmp)).read_text())
        try:
            png = base64.b64encode(Path(client.download_artifacts(run_id, "pareto.png", tmp)).read_bytes()).decode()
        except Exception:  # no plot when the front is empty
            png = ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(r['trial_id'])}</td><td>{_ci(r, 'score', 'score_low', 'score_high')}</td>"
        f"<td>{_ci(r, 'test_score', 'test_low', 'test_high')}</td><td>{_seeds(r)}</td><td>{r['trainable_params']:,}</td>"
        f"<td>{r['peak_memory_bytes'] / 2**20:.0f}</td><td>{e(' + '.join(c['method'] for c in r['recipe']['components']) or 'head only')}</td></tr>"
        for r in front)
    trials = []
    for c in sorted(children, key=lambda r: r.info.start_time):
        hist = client.get_metric_history(c.info.run_id, "score")
        scored = {m.step: int(m.value) for m in client.get_metric_history(c.info.run_id, "eval_examples")}
        rungs = ", ".join(f"{m.step}: {m.value:.3f}" + (f" on {scored[m.step]:,}" if m.step in scored else "")
                          for m in sorted(hist, key=lambda m: m.step))
        trials.append(f"<tr><td>{e(c.data.tags.get('trial_id', ''))}</td><td>{e(c.data.tags.get('status', ''))}</td>"
                      f"<td>{e(c.data.tags.get('pareto', ''))}</td><td>{int(c.data.metrics.get('trainable_params', 0)):,}</td>"
                      f"<td>{e(rungs)}</td></tr>")
    settings = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in sorted(parent.data.params.items()) if "." not in k)
    img = f'<img src="data:image/png;base64,{png}">' if png else ""
    m = parent.data.metrics
    reference = (f"<p>Reference: {e(parent.data.tags.get('reference', ''))} fine-tuning, dev "
                 f"{_ci(m, 'reference_score', 'reference_score_low', 'reference_score_high')}, test "
                 f"{_ci(m, 'reference_test_score', 'reference_test_low', 'reference_test_high')}</p>"
                 if "reference_test_score" in m else
                 f"<p>Reference: {e(parent.data.tags['reference'])} fine-tuning failed: "
                 f"{e(parent.data.tags.get('reference_error', ''))}</p>" if "reference_error" in parent.data.tags else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>autopeft search {e(parent.info.run_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}table{{border-collapse:collapse}}</style>
</head><body><h1>Search {e(parent.info.run_name)}</h1><ul>{settings}</ul>
<h2>Pareto front</h2><p>Scores with 95% bootstrap intervals: dev (carved from train; every search decision read it)
and test (the task's validation split, read once after the search).</p>
<table><tr><th>trial</th><th>dev score</th><th>test score</th><th>test mean ± std (seeds)</th><th>trainable params</th><th>peak MiB</th><th>methods</th></tr>{rows}</table>{reference}
{img}<h2>Trials</h2><table><tr><th>trial</th><th>status</th><th>pareto</th><th>params</th><th>dev score per rung (examples trained: score on N dev examples; a rung below the top may score a seeded sample of dev)</th></tr>
{''.join(trials)}</table></body></html>"""


def _ci(row: dict, key: str, low: str, high: str) -> str:
    """``0.8761 [0.8541, 0.8968]``, the score alone without an interval, ``n/a`` without a score."""
    from autopeft.data.uncertainty import fmt_ci

    return fmt_ci(row.get(key), row.get(low), row.get(high))


def _seeds(row: dict) -> str:
    c = row.get("confirm") or {}
    if c.get("test_mean") is None:
        return ""
    return f"{c['test_mean']:.4f} ± {c['test_std']:.4f} ({len(c['seeds'])} seeds)"


def main(argv: list[str] | None = None) -> int:
    from autopeft.searching.tracking import default_tracking_uri

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="autopeft")
    p.add_argument("--run", default=None, help="parent run id (default: the latest search)")
    p.add_argument("-o", "--output", default="search_report.html")
    a = p.parse_args(argv)
    try:
        page = build_report(a.tracking_uri or default_tracking_uri(), a.experiment, a.run)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(a.output).write_text(page)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
