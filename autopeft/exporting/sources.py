"""Where an export's weights come from: a search point's kept trained folder (trained first when
missing or trained on other inputs) and the provenance its model card records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from autopeft.composition.recipe import Recipe
from autopeft.errors import ExportError
from autopeft.exporting.checks import check_exportable
from autopeft.searching.runs import RUNS_DIR, TRAINED_ON_FILE, kept_dir, pick_point, settings_of, write_json
from autopeft.training.saved import is_trained_folder
from autopeft.training.trainer import train_and_save


@dataclass
class Provenance:
    """Where an exported model came from, for its model card. Every field may be unknown (``None``).

    Attributes:
        search: search name; search_path: its folder; searcher, seed, budget, space: its settings.
        trial_id: the Pareto point's trial; search_score: its dev score in the search (validation in
            searches from before dev splits; at ``fidelity`` training examples); trainable_params /
            trainable_percent: its count.
        trained_dir: the autopeft-format folder the weights were read from.
        metrics: metrics of the trained weights on the split they were scored on (``metrics.json``),
            e.g. ``{"accuracy": 0.868}``; metrics_split: that split (``dev`` or ``validation``).
        test_metrics: the same weights on the untouched test split (the search's front, or ``autopeft
            train``'s ``metrics.json``), ``{}`` when unknown.
    """

    search: str | None = None
    search_path: str | None = None
    searcher: str | None = None
    seed: int | None = None
    budget: str | None = None
    space: str | None = None
    trial_id: str | None = None
    search_score: float | None = None
    fidelity: int | None = None
    trainable_params: int | None = None
    trainable_percent: float | None = None
    trained_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_split: str = "validation"
    test_metrics: dict[str, float] = field(default_factory=dict)


def check_not_inside(out: Path, source: Path, search: bool = False) -> None:
    """Refuse an export folder that is the source folder or holds it, or (``search``) lies inside the
    search folder: replacing it (``--overwrite``) would delete the model or search being exported, or
    the weights a search keeps.

    Raises:
        ExportError: one line.
    """
    o, src = Path(out).resolve(), Path(source).resolve()
    if o == src or o in src.parents:
        raise ExportError(f"-o {out} {'is' if o == src else 'holds'} {source}, which is being exported: "
                          "pick another -o")
    if search and src in o.parents:
        raise ExportError(f"-o {out} is inside the search folder {source}: pick a folder outside it")


def fmt_score(x: float | None) -> str:
    """A score with 4 decimals, or ``unknown``."""
    return "unknown" if x is None else f"{x:.4f}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _provenance_of_search(folder: Path, row: dict) -> Provenance:
    s = settings_of(folder)
    return Provenance(search=folder.name, search_path=str(folder), searcher=s.get("searcher"), seed=s.get("seed"),
                      budget=s.get("budget"), space=s.get("space"), trial_id=row.get("trial_id"),
                      search_score=row.get("score"), fidelity=row.get("examples_seen"),
                      trainable_params=row.get("trainable_params"), trainable_percent=row.get("trainable_percent"))


def training_inputs(recipe: Recipe, data_dir: str | Path | None) -> dict[str, Any]:
    """What a recipe trains on, by content: ``{"data": {file: sha256}, "backbone": {file: sha256}}``.

    ``data``: the train and validation files its task reads with ``data_dir`` (a built-in task's
    ``<data_dir>/<folder>/<split>.tsv|parquet``; user data's file or folder, or a local ``hf:``
    folder); ``None`` where nothing can be read here (the hub, a folder without the task).
    ``backbone``: the files of a local backbone folder; ``None`` for a hub id, the bundled MiniLM
    (its package) or a bare config (the recipe holds it). The recipe itself is compared apart.
    """
    from autopeft.data.tasks import get_task, resolve_data_dir

    task = get_task(recipe.task)
    files: list[Path] = []
    base_dir: Path | None = None
    if task.spec is not None and task.spec.source is not None:
        from autopeft.data.userfiles import HF_PREFIX

        src = task.spec.source
        local = Path(src[len(HF_PREFIX):].partition(":")[0] if src.startswith(HF_PREFIX) else src).expanduser()
        if local.is_file():
            files, base_dir = [local], local.parent
        elif local.is_dir():
            files, base_dir = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")), local
    else:
        try:
            root = resolve_data_dir(data_dir)
        except Exception:  # noqa: BLE001 - a folder that is gone: nothing to compare
            root = None
        if root is not None:
            base_dir = root
            for split in ("train", "validation"):
                base = root / (task.folder or task.name) / task.splits.get(split, split)
                files += [f for f in (base.with_suffix(".tsv"), base.with_suffix(".parquet")) if f.is_file()]
    backbone = None
    if isinstance(recipe.backbone, str) and Path(recipe.backbone).expanduser().is_dir():
        folder = Path(recipe.backbone).expanduser()
        backbone = _hashes(sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")), folder)
    return {"data": _hashes(files, base_dir) if files and base_dir else None, "backbone": backbone}


def _hashes(files: list[Path], root: Path) -> dict[str, str]:
    """``{path relative to root: sha256 of the file}``."""
    import hashlib

    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[f.relative_to(root).as_posix()] = h.hexdigest()
    return out


def _same_inputs(recorded: dict | None, now: dict) -> bool:
    """Whether weights trained on ``recorded`` (:func:`training_inputs`) answer for ``now``: every
    part known on both sides is equal (weights trained before this record was kept: assumed so)."""
    if not recorded:
        return True
    return all(recorded.get(k) is None or now.get(k) is None or recorded.get(k) == now.get(k)
               for k in ("data", "backbone"))


def _metrics_of(folder: Path, key: str = "metrics") -> dict[str, float]:
    """``metrics.json``'s ``key`` (``metrics``: the split the weights were scored on; ``test_metrics``)."""
    return {k: float(v) for k, v in (_read_json(folder / "metrics.json").get(key) or {}).items()
            if isinstance(v, (int, float))}


def fill_metrics(prov: Provenance, folder: Path, row: dict | None = None) -> Provenance:
    """Set ``prov``'s metrics from a trained folder's ``metrics.json`` and, for a search point, the
    test metrics the search measured for it (``row["test_metrics"]``)."""
    prov.metrics = _metrics_of(folder)
    prov.metrics_split = str(_read_json(folder / "metrics.json").get("eval_split") or "validation")
    prov.test_metrics = dict((row or {}).get("test_metrics") or {}) or _metrics_of(folder, "test_metrics")
    return prov


def trained_source(search: str | Path, pick: str = "best", output_dir: str | Path = RUNS_DIR,
                   fmt: str = "peft", data_dir: str | None = None, train: bool = True,
                   log: Callable[[str], None] | None = print,
                   train_with: Callable[..., Any] | None = None,
                   output: Path | None = None) -> tuple[Path, Provenance]:
    """The trained-weights folder of a search point (training it first when needed) and its provenance.

    Checks that the point can be exported as ``fmt`` *before* training. The weights go to
    ``<search>/trained/<trial id>/`` (autopeft's format, :func:`autopeft.training.saved.save_trained`) and are
    reused when that folder already holds the same recipe. ``data_dir`` defaults to the search's own.
    ``train_with(recipe, data_dir=, output_dir=, log=)`` trains it (default
    :func:`autopeft.training.trainer.train_and_save`; :func:`autopeft.api.export` passes :func:`autopeft.api.train`).
    ``output``: the export's folder, refused before any training when it is the search folder or holds it.

    Raises:
        SearchNotFoundError, ValueError: no such search / point; ExportError: not exportable as
            ``fmt``, or no trained weights and ``train`` is false.
    """
    from autopeft.composition.recipe import load_recipe

    folder, row = pick_point(search, pick, output_dir)
    if output is not None:
        check_not_inside(output, folder, search=True)
    recipe = Recipe.model_validate(row["recipe"])
    prov = _provenance_of_search(folder, row)
    tid = str(row.get("trial_id") or pick)
    hint = f"autopeft export {folder} --pick {tid} -o best.yaml, then autopeft train --recipe best.yaml"
    check_exportable(recipe, fmt, hint)
    target = kept_dir(folder, tid)
    recorded = settings_of(folder).get("data_dir")
    data_dir = data_dir or (recorded if recorded and Path(recorded).is_dir() else None) \
        or os.environ.get("AUTOPEFT_DATA_DIR")
    inputs = training_inputs(recipe, data_dir)
    same_inputs = _same_inputs(_read_json(target / TRAINED_ON_FILE) or None, inputs)
    if is_trained_folder(target) and load_recipe(target / "recipe.yaml") == recipe and same_inputs:
        if log:
            log(f"using the trained weights in {target}")
    else:
        if not train:
            raise ExportError(f"search {folder.name} keeps no trained weights for trial {tid}"
                              f"{'' if same_inputs else ' on this data'}: train it first "
                              f"({hint} -o DIR) and export DIR, or allow training (--train)")
        if log and not same_inputs and is_trained_folder(target):
            log(f"the weights in {target} were trained on other data or another backbone: training again")
        if log:
            log(f"no kept weights for trial {tid}{'' if same_inputs else ' on this data'}: training its recipe "
                f"({recipe.training.max_train_examples:,} examples, seed {recipe.training.seed}; search score "
                f"{fmt_score(row.get('score'))}) into {target}")
        (train_with or train_and_save)(recipe, data_dir=data_dir, output_dir=target, log=log)
        write_json(target / TRAINED_ON_FILE, inputs)
    prov.trained_dir = str(target)
    return target, fill_metrics(prov, target, row)
