"""A pytest plugin that runs timm's own model test suite (``tests/test_models.py`` of the timm source release) on
this project's classifiers, as a timm user would meet them.

Loaded with ``-p timm_model_suite`` (this folder and the repository root on ``sys.path``); ``test_timm_api.py``
runs it. It imports the model modules (registering the models with timm), makes timm's model listing return only
``MODELS`` (for a ``module=`` filter, timm's list of modules with ``forward_intermediates``, the two model modules
count as such), and keeps only the tests parametrised over them (the tests that name timm's own models go).
"""

import inspect

import timm
import timm.models

import models_mixmim  # noqa: F401  (registers the MixMIM models)
import models_vit  # noqa: F401  (registers the ViT classifiers)

MODELS = ("vit_tiny_patch4", "mixmim_tiny_ft")
MODULES = ("models_vit", "models_mixmim")

_list_models = timm.list_models
_signature = inspect.signature(_list_models)


def _our_models(*args, **kwargs) -> list[str]:
    bound = _signature.bind(*args, **kwargs)
    if bound.arguments.get("module"):
        bound.arguments["module"] = list(MODULES)
    return [name for name in _list_models(*bound.args, **bound.kwargs) if name.split(".")[0] in MODELS]


timm.list_models = timm.models.list_models = _our_models


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (kept if params.get("model_name") in MODELS else dropped).append(item)
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)
