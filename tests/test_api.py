import importlib
import pkgutil

import autopeft
from autopeft import api


def test_public_functions_survive_importing_every_submodule():
    for info in pkgutil.walk_packages(autopeft.__path__, "autopeft."):
        importlib.import_module(info.name)
    assert (autopeft.search, autopeft.export, autopeft.train, autopeft.count) == (api.search, api.export, api.train, api.count)


def test_export_is_one_entry_over_a_registry_of_formats(tmp_path):
    """``api.export(search_or_output, fmt=...)`` dispatches to the writers of ``EXPORT_FORMATS``; an unknown
    format is a one-line error from the API and from the CLI (exit 2), before anything is read."""
    import pytest
    from typer.testing import CliRunner

    from autopeft.cli import app
    from autopeft.errors import ExportError
    from autopeft.exporting.exporters import EXPORT_FORMATS

    assert list(EXPORT_FORMATS) == ["recipe", "peft", "merged"]
    with pytest.raises(ExportError, match=r"^unknown export format 'onnx'; valid: recipe, peft, merged$"):
        api.export(tmp_path / "nothing", fmt="onnx")
    res = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), "--format", "onnx"])
    assert res.exit_code == 2 and res.output.strip() == "error: unknown --format 'onnx'; valid: recipe, peft, merged"
