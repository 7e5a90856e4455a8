"""The layout's promises: one model table that knows every registered model, and entry scripts that import no
other script."""

import ast
from pathlib import Path

import pytest
import timm
import torch

import model_table as table
from util import faults
from util.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["main_pretrain.py", "main_finetune.py", "main_linprobe.py", "main_knn.py", "visualize.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_scripts_import_no_other_script(script: str) -> None:
    tree = ast.parse((ROOT / script).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    scripts = {p.stem for p in ROOT.glob("*.py")} - MODEL_FILES
    scripts -= {"engine_pretrain", "engine_finetune"}  # the engines are modules, imported by the scripts
    assert not imported & scripts, f"{script} imports {sorted(imported & scripts)}"


MODEL_FILES = {"models_mae", "models_vit", "models_mixmim", "models_backbone", "model_table"}


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "util").glob("*.py")), ids=lambda p: p.name)
def test_util_imports_no_model_file(path: Path) -> None:
    """Imports point down: the model files and the model table import util/, never the other way round."""
    up = {name for name in _imported_modules(path) if name.split(".")[0] in MODEL_FILES}
    assert not up, f"util/{path.name} imports {sorted(up)}"


def test_the_model_files_import_each_other_only_downwards() -> None:
    """models_mae <- models_vit, models_mixmim <- model_table <- models_backbone: no circle."""
    order = ["models_mae", "models_vit", "models_mixmim", "model_table", "models_backbone"]
    for i, name in enumerate(order):
        later = {m for m in _imported_modules(ROOT / f"{name}.py") if m in order[i:]}
        assert not later, f"{name}.py imports {sorted(later)}, which sit above it"


def test_the_table_names_every_registered_model_once() -> None:
    registered = set()
    for module in ("models_mae", "models_vit", "models_mixmim"):
        registered |= set(timm.list_models(module=module))
    named = [n for a in table.ARCHITECTURES for n in (a.pretrain, a.classifier, *a.official_names) if n]
    assert len(named) == len(set(named))
    assert registered <= set(named), f"not in model_table.py's table: {sorted(registered - set(named))}"


@pytest.mark.parametrize("arch", table.ARCHITECTURES, ids=lambda a: a.classifier)
def test_each_architecture_answers_every_question(arch: table.Architecture) -> None:
    """Family, task, partner and input size agree with the model each name builds."""
    with torch.device("meta"):
        clf = timm.create_model(arch.classifier)
        pre = timm.create_model(arch.pretrain) if arch.pretrain else None
    assert table.family_of(clf) == table.family_of(arch.classifier) == arch.family
    assert not table.is_pretrain_model(clf)
    assert table.default_input_size(arch.classifier) == (
        clf.img_size if arch.family == "mixmim" else clf.patch_embed.img_size[0]
    )
    for official in arch.official_names:
        assert table.resolve_classifier_name(official) == arch.classifier
    if pre is not None:
        assert table.is_pretrain_model(pre) and table.family_of(pre) == arch.family
        assert table.resolve_classifier_name(arch.pretrain) == arch.classifier
        assert table.resolve_pretrain_name(arch.classifier) == arch.pretrain
    else:
        with pytest.raises(UsageError, match="there is no pretraining model"):
            table.resolve_pretrain_name(arch.classifier)


def test_built_models_are_known_through_their_wrappers() -> None:
    model = timm.create_model("mixmim_tiny")
    assert table.family_of(torch.compile(model)) == "mixmim"  # compiles nothing until called
    assert table.is_pretrain_model(torch.compile(model))
    with pytest.raises(TypeError, match="Linear is not one of this project's models"):
        table.family_of(torch.nn.Linear(2, 2))


def test_fault_injection_adds_no_call_to_the_training_step(monkeypatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.step_killer() is None
    monkeypatch.setenv(faults.ENV, "save:1")  # a checkpoint-write fault arms no step either
    assert faults.step_killer() is None
    monkeypatch.setenv(faults.ENV, "step:3")
    assert callable(faults.step_killer())
