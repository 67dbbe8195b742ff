import importlib
import pkgutil

import autopeft
from autopeft import api


def test_public_functions_survive_importing_every_submodule():
    for info in pkgutil.walk_packages(autopeft.__path__, "autopeft."):
        importlib.import_module(info.name)
    assert (autopeft.search, autopeft.export, autopeft.train, autopeft.count) == (api.search, api.export, api.train, api.count)
