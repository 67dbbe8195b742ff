"""Export formats: one small registry of writers behind :func:`autopeft.api.export`.

A format is a row of :data:`EXPORT_FORMATS`: its name (``--format NAME``), what it writes (for
messages) and a writer ``write(source, *, pick, output, output_dir, **options)`` that returns what it
wrote. Built in:

* ``recipe``: autopeft's own training recipe (YAML) of a search point, or of a trained folder
  (:func:`write_recipe`);
* ``peft``: a Hugging Face peft adapter folder; ``merged``: a plain transformers model with every
  linear update folded in (both :func:`autopeft.exporting.hf_export.export_model`).

To add a format, write its writer (any module) and add its row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autopeft._util import check_can_write, is_finite
from autopeft.data.uncertainty import fmt_ci
from autopeft.errors import ExportError
from autopeft.searching.runs import RUNS_DIR, pick_point, settings_of


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: ``--format NAME``. writes: what it writes, for messages (``peft adapter folder``).
        write: ``write(source, *, pick, output, output_dir, **options)``; raises a one-line error.
        folder: it writes a folder (``-o DIR`` required), not a file.
        trains: it needs trained weights, so a search point without kept weights is trained first;
            the writer takes ``train_with`` (:func:`autopeft.api.export` passes :func:`autopeft.api.train`).
    """

    name: str
    writes: str
    write: Callable[..., Any]
    folder: bool = True
    trains: bool = True


def write_recipe(source: str | Path, *, pick: str | None = None, output: str | Path | None = None,
                 output_dir: str | Path = RUNS_DIR, overwrite: bool = False, **_: Any):
    """The training recipe of one search point (``pick``, as :func:`autopeft.searching.runs.pick_point`), or
    of a trained folder's own model; written to ``output`` (a search point's recipe with a provenance
    comment) when given.

    Returns:
        The :class:`autopeft.composition.recipe.Recipe`.

    Raises:
        SearchNotFoundError: no such search or an empty front; ValueError: unknown ``pick``;
        ExportError: ``output`` is a folder, or an existing file and not ``overwrite`` (checked before
            anything is read); a ``pick`` other than ``best`` for a trained folder (it holds one model).
    """
    from autopeft.composition.recipe import Recipe, load_recipe
    from autopeft.training.saved import is_trained_folder

    if output is not None:
        check_output_file(Path(output), overwrite)
    if is_trained_folder(source):  # a trained folder's own recipe
        if pick not in (None, "best"):
            raise ExportError(f"{source} holds one trained model; --pick applies to searches")
        recipe = load_recipe(Path(source) / "recipe.yaml")
        if output:
            recipe.save(output)
        return recipe
    folder, row = pick_point(source, pick or "best", output_dir)
    recipe = Recipe.model_validate(row["recipe"])
    if output:
        recipe.save(output)
        Path(output).write_text(provenance_comment(folder, row) + Path(output).read_text())
    return recipe


def check_output_file(output: Path, overwrite: bool) -> None:
    """Refuse to write a file where a folder is, or over an existing file unless ``overwrite``.

    Raises:
        ExportError: one line, with what to do instead.
    """
    if output.is_dir():
        raise ExportError(f"-o {output} is a folder: give the recipe file to write (e.g. {output / 'best.yaml'})")
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists: pick another -o, or pass --overwrite to replace it")
    check_can_write(output, "-o", ExportError, folder=False)


def provenance_comment(folder: Path, row: dict) -> str:
    """YAML comment lines naming the search (name, searcher, seed), the trial and its score: the
    recipe file's model card."""
    s = settings_of(folder)
    where = f" at {row['examples_seen']:,} training examples" if isinstance(row.get("examples_seen"), int) else ""
    split = "dev" if (row.get("recipe") or {}).get("dev") else "validation"
    test = (f"; test {fmt_ci(row.get('test_score'), row.get('test_low'), row.get('test_high'))}"
            if is_finite(row.get("test_score")) else "")
    return (f"# exported by autopeft from search {folder.name} (searcher {s.get('searcher', 'unknown')}, "
            f"seed {s.get('seed', 'unknown')}, budget {s.get('budget', 'unknown')})\n"
            f"# trial {row.get('trial_id')}: {split} score "
            f"{fmt_ci(row.get('score'), row.get('score_low'), row.get('score_high'))}{test}{where}, "
            f"{row.get('trainable_params', 0):,} trainable parameters without the head\n")


def _hf(fmt: str) -> Callable[..., Any]:
    def write(source: str | Path, *, pick: str | None = None, output: str | Path | None = None,
              output_dir: str | Path = RUNS_DIR, **options: Any):
        from autopeft.exporting.hf_export import export_model

        return export_model(source, fmt=fmt, output=output, pick=pick, output_dir=output_dir, **options)

    write.__doc__ = f"Write ``source`` as a {fmt} folder (:func:`autopeft.exporting.hf_export.export_model`)."
    return write


#: The export formats by name (``recipe`` first: the default).
EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("recipe", "training recipe", write_recipe, folder=False, trains=False),
    ExportFormat("peft", "peft adapter folder", _hf("peft")),
    ExportFormat("merged", "merged transformers model", _hf("merged")),
)}


def get_format(name: str) -> ExportFormat:
    """The export format ``name``.

    Raises:
        ExportError: no such format (one line, with the valid ones).
    """
    if name not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {name!r}; valid: {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[name]
