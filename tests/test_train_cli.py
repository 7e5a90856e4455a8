"""Model-name mapping across scripts, and one-line errors for bad input (no traceback, exit status 1)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import make_image_folder, parse, tiny_run_args

import main_finetune
import main_linprobe
import main_pretrain
from model_table import family_of, resolve_classifier_name, resolve_pretrain_name
from util.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "name, pretrain, classifier, family",
    [
        ("mae_vit_base_patch16", "mae_vit_base_patch16", "vit_base_patch16", "mae"),
        ("mae_vit_large_patch16_dec512d8b", "mae_vit_large_patch16_dec512d8b", "vit_large_patch16", "mae"),
        ("vit_huge_patch14", "mae_vit_huge_patch14", "vit_huge_patch14", "mae"),
        ("mixmim_base", "mixmim_base", "mixmim_base_ft", "mixmim"),
        ("mixmim_large_ft", "mixmim_large", "mixmim_large_ft", "mixmim"),
    ],
)
def test_every_script_takes_both_families(name: str, pretrain: str, classifier: str, family: str) -> None:
    assert resolve_pretrain_name(name) == pretrain
    assert resolve_classifier_name(name) == classifier
    assert family_of(resolve_classifier_name(name)) == family
    assert resolve_classifier_name("mixmim_base_384") == "mixmim_base_384_ft"


def test_unknown_model_lists_the_choices() -> None:
    """Every name that is accepted is listed, the aliases too, and each resolves to the model it is listed with."""
    with pytest.raises(UsageError, match="unknown pretraining --model 'mae_vit_giant'") as pre:
        resolve_pretrain_name("mae_vit_giant")
    with pytest.raises(UsageError, match="unknown classifier --model 'vit_giant'") as clf:
        resolve_classifier_name("vit_giant")
    for message, models in ((str(pre.value), 8), (str(clf.value), 10)):  # every architecture with such a model
        entries = message.split("choose one of: ")[1].split("), ")
        assert len(entries) == models
        for entry in entries:
            own, _, others = entry.rstrip(")").partition(" (also ")
            for alias in others.split(", "):  # each name listed with a model builds that architecture
                assert resolve_classifier_name(alias) == resolve_classifier_name(own), entry
    assert "mae_vit_base_patch16 (also mae_vit_base_patch16_dec512d8b, vit_base_patch16)" in str(pre.value)
    assert "mixmim_base_384_ft (also mixmim_base_384)" in str(clf.value)
    assert "mixmim_base_384" not in str(pre.value)  # no pretraining model of that size


def test_a_classifier_without_a_pretraining_model_says_so() -> None:
    with pytest.raises(UsageError, match="there is no pretraining model 'mixmim_base_384': it is a classifier"):
        resolve_pretrain_name("mixmim_base_384")


def run(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, "--device", "cpu", "--num_workers", "0", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (
            "main_pretrain.py",
            ["--model", "mae_vit_tiny_patch4", "--input_size", "30"],
            "--input_size 30 is not a multiple of 4",
        ),
        ("main_finetune.py", ["--model", "vit_tiny_patch4", "--data_path", "EMPTY"], "holds no images"),
    ],
)
def test_bad_input_fails_with_one_line(tmp_path: Path, script: str, argv: list[str], message: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=1, val_per_class=1)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    if "--data_path" not in argv:
        argv += ["--data_path", str(data)]
    proc = run(script, *argv, "--output_dir", str(tmp_path / "out"), "--batch_size", "2")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "script, model",
    [(main_pretrain, "mae_vit_tiny_patch4"), (main_finetune, "vit_tiny_patch4"), (main_linprobe, "vit_tiny_patch4")],
)
def test_compile_mode_reaches_torch_compile(tmp_path: Path, script, model: str, monkeypatch) -> None:
    """--compile --compile_mode M compiles with mode M (torch.compile recorded here and left out: the mode's own
    effect is torch's; the compiled run itself is test_train_e2e.py's)."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: (modes.append(mode), model)[1])
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    flags = tiny_run_args(data, tmp_path / "out", model=model, epochs=1, warmup_epochs=0, batch_size=2, nb_classes=2)
    if script is main_pretrain:
        del flags["nb_classes"]
    script.main(parse(script.get_args_parser(), **flags, compile=True, compile_mode="reduce-overhead"))
    assert modes == ["reduce-overhead"]


@pytest.mark.parametrize(
    "script, overrides, message",
    [
        (main_pretrain, dict(model="mae_vit_tiny_patch4", mask_ratio=1.0), r"--mask_ratio must be in \(0, 1\)"),
        (main_pretrain, dict(model="mixmim_tiny", batch_size=1), "--batch_size must be at least 2"),
        (main_pretrain, dict(model="mae_vit_tiny_patch4", accum_iter=0), "--accum_iter must be at least 1"),
        (main_linprobe, dict(model="nope"), "unknown classifier --model 'nope'"),
        (main_finetune, dict(model="vit_tiny_patch4", nb_classes=1), "has 2 classes but --nb_classes is 1"),
        (main_finetune, dict(model="vit_tiny_patch4", resume="missing.pth"), "--resume missing.pth does not exist"),
        (main_finetune, dict(model="vit_tiny_patch4", data_path="/nonexistent"), "/nonexistent does not exist"),
        (main_finetune, dict(model="vit_tiny_patch4", data_path=__file__), "is a file, not a folder"),
        (main_linprobe, dict(model="vit_tiny_patch4", compile_mode="max-autotune"), "max-autotune needs --compile"),
    ],
)
def test_bad_arguments_raise_usage_errors(tmp_path: Path, script, overrides: dict, message: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=1, val_per_class=1)
    kw = {**tiny_run_args(data, tmp_path / "out"), **overrides}
    with pytest.raises(UsageError, match=message):
        script.main(parse(script.get_args_parser(), **kw))


@pytest.mark.parametrize("script, model", [(main_pretrain, "mae_vit_tiny_patch4"), (main_linprobe, "vit_tiny_patch4")])
def test_tensorboard_events_go_to_the_output_dir_by_default(tmp_path: Path, script, model: str, monkeypatch) -> None:
    """Without --log_dir the events land in --output_dir, not in ./output_dir of the working folder (the official
    default); --log_dir '' writes none. (util.run.start_run does it for every script; main_finetune's parser
    default is checked in test_official_recipes.py.)"""
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    flags = tiny_run_args(data, tmp_path / "out", model=model, epochs=1, warmup_epochs=0, batch_size=2, log_dir=None)
    args = parse(script.get_args_parser(), **flags)
    assert args.log_dir is None
    script.main(args)
    assert [p.parent for p in tmp_path.rglob("events.out.tfevents.*")] == [tmp_path / "out"]
    if script is main_pretrain:  # the same start_run serves all three: '' checked once
        flags.update(output_dir=tmp_path / "quiet", log_dir="")
        script.main(parse(script.get_args_parser(), **flags))
        assert (tmp_path / "quiet" / "checkpoint-last.pth").exists()
        assert not list((tmp_path / "quiet").glob("events.out.tfevents.*"))
        assert not list((tmp_path / "data").rglob("events.out.tfevents.*"))


def head_size(checkpoint: Path) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return state["head.weight" if "head.weight" in state else "head.1.weight"].shape[0]  # the linear probe: BN + fc


@pytest.mark.parametrize(
    "script, extra", [(main_finetune, dict(mixup=0.8, cutmix=1.0)), (main_linprobe, {})], ids=["finetune", "linprobe"]
)
def test_nb_classes_defaults_to_the_folders_class_count(tmp_path: Path, script, extra: dict, caplog) -> None:
    """Not given: the head has the training folder's 3 classes (said in the log), mixup's soft targets too; --eval
    --resume of that checkpoint takes the validation folder's count and loads it."""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=2, val_per_class=1)
    flags = tiny_run_args(data, tmp_path / "out", model="vit_tiny_patch4", epochs=1, warmup_epochs=0, batch_size=2)
    with caplog.at_level("INFO"):
        script.main(parse(script.get_args_parser(), **flags, **extra))
    assert head_size(tmp_path / "out" / "checkpoint-last.pth") == 3
    assert any(r.getMessage() == f"--nb_classes 3: the class count of {data / 'train'}" for r in caplog.records)
    evaluation = parse(script.get_args_parser(), **flags, eval=True, resume=tmp_path / "out" / "checkpoint-0.pth")
    assert 0 <= script.main(evaluation)["acc1"] <= 100
    assert evaluation.nb_classes == 3  # the validation folder's


def test_nb_classes_larger_than_the_folders_is_allowed_with_a_warning(tmp_path: Path, caplog) -> None:
    """As official, a head larger than the folder's classes trains (e.g. an ImageNet-1k head on a subset); the log
    says how many outputs have no images. (Smaller: test_bad_arguments_raise_usage_errors.)"""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=2, val_per_class=1)
    flags = tiny_run_args(data, tmp_path / "out", model="vit_tiny_patch4", epochs=1, warmup_epochs=0, batch_size=2)
    main_linprobe.main(parse(main_linprobe.get_args_parser(), **flags, nb_classes=5))
    assert head_size(tmp_path / "out" / "checkpoint-last.pth") == 5
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    expected = f"--nb_classes 5 is more than the 3 classes of {data / 'train'} and {data / 'val'}: 2 outputs of the "
    assert expected + "head have no images" in warned, warned


@pytest.mark.parametrize("script", [main_finetune, main_linprobe])
def test_eval_with_finetune_is_refused(tmp_path: Path, script, monkeypatch) -> None:
    """--eval evaluates --resume; --finetune would be ignored (as in the official scripts), so the pair is refused
    in one line, before any work."""
    import util.run

    monkeypatch.setattr(util.run, "seed_everything", lambda *a: pytest.fail("work started before the refusal"))
    data = make_image_folder(tmp_path / "data", per_class=1, val_per_class=1)
    ckpt = tmp_path / "pretrained.pth"
    torch.save({"model": {}}, ckpt)
    args = parse(script.get_args_parser(), **tiny_run_args(data, tmp_path / "out"), eval=True, finetune=ckpt)
    with pytest.raises(UsageError, match=f"--eval evaluates the --resume checkpoint .*--finetune {ckpt}") as e:
        script.main(args)
    assert "\n" not in str(e.value)


def test_nb_classes_resolution_without_a_run(tmp_path: Path) -> None:
    """util.datasets.resolve_num_classes: the training set's count by default (the validation set's with --eval),
    the --resume checkpoint's head when resuming, and one-line errors for a set with more classes than the head
    (datasets passed in without a root too) and for images without a class list."""
    from types import SimpleNamespace

    from util.datasets import resolve_num_classes

    def args(nb_classes=None, eval=False, resume=""):
        return SimpleNamespace(nb_classes=nb_classes, eval=eval, resume=resume)

    train = SimpleNamespace(root="train", classes=["a", "b"])
    val = SimpleNamespace(root="val", classes=["a", "b", "c"])
    assert resolve_num_classes(args(3), train, val) == 3
    assert resolve_num_classes(args(eval=True), None, val) == 3
    with pytest.raises(UsageError, match=r"^val has 3 classes but train has 2 \(the default --nb_classes\); set "):
        resolve_num_classes(args(), train, val)
    rootless = [SimpleNamespace(classes=list(range(n))) for n in (12, 10)]  # datasets passed in: no root
    with pytest.raises(UsageError, match="the training set has 12 classes but --nb_classes is 10"):
        resolve_num_classes(args(10), *rootless)
    assert resolve_num_classes(args(), *rootless) == 12
    with pytest.raises(UsageError, match="no class list to count: pass --nb_classes"):
        resolve_num_classes(args(), [(0, 0)], val)
    for key, rows in (("head.weight", 7), ("head.1.weight", 5)):  # fine-tuned, linear probe
        ckpt = tmp_path / f"{rows}.pth"
        torch.save({"model": {key: torch.zeros(rows, 4)}}, ckpt)
        assert resolve_num_classes(args(resume=str(ckpt)), train, val) == rows
        assert resolve_num_classes(args(9, resume=str(ckpt)), train, val) == 9  # the flag wins


def test_cls_token_is_warned_about_for_mixmim_only_when_chosen(caplog) -> None:
    """MixMIM classifiers always pool: an explicit --cls_token (global_pool False) is warned about, no choice (the
    linear probe's default, passed as None for MixMIM) is not."""
    from model_table import build_classifier

    with caplog.at_level("WARNING"):
        build_classifier("mixmim_tiny_ft", 64, 2, 0.0, global_pool=None)
    assert not [r for r in caplog.records if "--cls_token" in r.getMessage()]
    with caplog.at_level("WARNING"):
        build_classifier("mixmim_tiny_ft", 64, 2, 0.0, global_pool=False)
    assert [r for r in caplog.records if "--cls_token is ignored for mixmim_tiny_ft" in r.getMessage()]
