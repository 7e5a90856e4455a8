"""The layout's promises: one model table that knows every registered model, and entry scripts that import no
other script."""

import ast
import re
from pathlib import Path

import pytest
import timm
import torch

import model_table as table
from util import faults
from util.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["main_pretrain.py", "main_finetune.py", "main_linprobe.py", "main_knn.py", "main_segment.py", "visualize.py",
           "convert.py"]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_scripts_import_no_other_script(script: str) -> None:
    tree = ast.parse((ROOT / script).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    scripts = {p.stem for p in ROOT.glob("*.py")} - MODEL_FILES
    scripts -= {"engine_pretrain", "engine_finetune", "engine_segment"}  # the engines are modules, imported by scripts
    assert not imported & scripts, f"{script} imports {sorted(imported & scripts)}"


MODEL_FILES = {"models_mae", "models_vit", "models_mixmim", "models_backbone", "models_segment", "model_table"}


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
    """models_mae <- models_vit, models_mixmim <- model_table <- models_backbone, models_segment: no circle."""
    order = ["models_mae", "models_vit", "models_mixmim", "model_table", "models_backbone", "models_segment"]
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


def _layout_names() -> set[str]:
    """The paths README's Layout block names in its first column: ``util/optim.py, lars.py`` names
    ``util/optim.py`` and ``util/lars.py``; a continuation line (indented) names nothing."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    names = set()
    for line in block.splitlines():
        if not line.strip() or line.startswith(" "):
            continue
        folder = ""
        for item in re.split(r",\s*", re.split(r"\s{2,}", line.strip())[0]):
            folder = item.rpartition("/")[0] or folder
            names.add(item if "/" in item else f"{folder}/{item}".lstrip("/"))
    return names


def test_the_readme_layout_names_every_module_and_script() -> None:
    """Every .py file at the top level and in util/, and every file in scripts/, has a line in README's Layout."""
    files = [p for p in [*ROOT.glob("*.py"), *(ROOT / "util").glob("*.py")] if p.name != "__init__.py"]
    files += [p for p in (ROOT / "scripts").iterdir() if p.is_file()]
    missing = sorted(str(p.relative_to(ROOT)) for p in files if str(p.relative_to(ROOT)) not in _layout_names())
    assert not missing, f"not in README.md's Layout: {missing}"


def test_benchmarks_md_names_every_file_of_benchmarks() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    missing = sorted(
        p.name for p in (ROOT / "benchmarks").iterdir() if p.is_file() and f"benchmarks/{p.name}" not in text
    )
    assert not missing, f"not in BENCHMARKS.md: {missing}"
