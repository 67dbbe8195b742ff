"""The old import paths (before the modules moved into one folder per layer) still import the same
module objects (:mod:`autopeft._aliases`): for users, for ``mock.patch`` targets, for Ray and for old
pickles such as a ``checkpoint.pkl`` that names ``autopeft.hpo.searchers``."""

import importlib
import pickle
import subprocess
import sys
from unittest import mock

import pytest

import autopeft
from autopeft._aliases import ALIASES, new_name


@pytest.mark.parametrize("old,new", sorted(ALIASES.items()))
def test_every_old_path_is_the_same_module_as_its_new_one(old, new):
    module = importlib.import_module(old)
    assert module is importlib.import_module(new) is sys.modules[old] is sys.modules[new]
    assert module.__name__ == new and module.__spec__.name == new  # the real module keeps its own name
    assert getattr(autopeft, old.split(".")[1]) is sys.modules[f"autopeft.{old.split('.')[1]}"]


def test_names_under_an_old_package_are_the_new_packages_modules():
    import autopeft.hpo.searchers as old
    from autopeft.hpo import tune
    import autopeft.searching.searchers as new

    assert old is new and tune is sys.modules["autopeft.searching.tune"]
    assert new_name("autopeft.hpo.runs") == "autopeft.searching.runs"
    assert new_name("autopeft.api") is None and new_name("autopeft.backbones") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("autopeft.hpo.no_such_module")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("autopeft.trainer.run_trial")  # a function, not a module
    with pytest.raises(AttributeError):
        autopeft.no_such_module


def test_patching_an_old_path_patches_the_new_one():
    from autopeft.training import trainer

    real = trainer.run_trial
    with mock.patch("autopeft.trainer.run_trial", return_value="patched") as fake:
        assert trainer.run_trial is fake and trainer.run_trial() == "patched"
    assert trainer.run_trial is real
    with mock.patch("autopeft.hpo.searchers.SAMPLERS", {}):
        assert importlib.import_module("autopeft.searching.searchers").SAMPLERS == {}


def test_an_old_pickle_loads_and_new_pickles_name_the_new_path():
    from autopeft.searching.searchers import PicklableNSGAIISampler

    old = pickle.dumps(PicklableNSGAIISampler, protocol=2).replace(b"autopeft.searching.searchers", b"autopeft.hpo.searchers")
    assert b"autopeft.hpo.searchers" in old and pickle.loads(old) is PicklableNSGAIISampler
    from autopeft.trainer import run_trial

    assert b"autopeft.training.trainer" in pickle.dumps(run_trial)


def test_an_old_path_works_first_in_a_fresh_interpreter():
    """Nothing imported before (as in a Ray worker unpickling an old name, or a user's script)."""
    code = ("import sys, pickle; from autopeft.hpo.runs import RUNS_DIR; import autopeft.trainer as t; "
            "assert sys.modules['autopeft.hpo.runs'] is sys.modules['autopeft.searching.runs']; "
            "assert t.__spec__.name == 'autopeft.training.trainer'; "
            "assert pickle.loads(b'cautopeft.hpo.pareto\\npareto_front\\n.').__module__ == 'autopeft.searching.pareto'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
