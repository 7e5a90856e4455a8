"""Faults and bad input: kills (in a step, in a checkpoint write, one torchrun rank), unreadable images, a non-finite
loss, checkpoints that do not fit, and arguments that cannot work.

Kills are deterministic: ``MAE_FAULT_INJECT`` (util/faults.py) makes the process SIGKILL itself at a given step or
partway through a given checkpoint write.
"""

import argparse
import hashlib
import io
import json
import pickle
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import env_without_dist, free_port, make_image_folder

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import util.run
from util.cli import run_cli
from util.datasets import image_folder, pretrain_transform, train_loader, val_loader
from util.errors import BadImageError

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_linprobe}
MODELS = {  # (pretraining, classifier) per family
    "mae": ("mae_vit_tiny_patch4", "vit_tiny_patch4"),
    "mixmim": ("mixmim_tiny", "mixmim_tiny_ft"),
}


def argv(data: Path, out: Path, **kw) -> list[str]:
    """A tiny CPU run's command line (8 training images, batch 4: 2 steps per epoch)."""
    kw = {
        **dict(
            data_path=data,
            output_dir=out,
            log_dir=out,
            device="cpu",
            num_workers=0,
            input_size=32,
            batch_size=4,
            print_freq=100,
            epochs=1,
        ),
        **kw,
    }
    args = []
    for k, v in kw.items():
        if v is not None:
            args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return args


def cli(script, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run ``script`` through its real command-line entry (``run_cli``) in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *args])
    parser = argparse.ArgumentParser(parents=[script.get_args_parser()])
    try:
        run_cli(parser, script.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed run (and there is exactly one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoints(out: Path) -> dict[str, bytes]:
    """Every checkpoint file in ``out`` (temporary files included) by name, with its SHA-256."""
    return {p.name: hashlib.sha256(p.read_bytes()).digest() for p in sorted(out.iterdir()) if "checkpoint" in p.name}


def assert_all_load_weights_only(out: Path) -> dict[str, int]:
    """Every ``checkpoint-*.pth`` loads with plain ``torch.load(weights_only=True)``; returns their epochs."""
    epochs = {p.name: load(p)["epoch"] for p in out.glob("checkpoint-*.pth")}
    assert epochs
    return epochs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> dict[str, Path]:
    """One finished epoch of pretraining per family: ``{family: output_dir}``."""
    runs = {}
    for family, (model, _) in MODELS.items():
        out = tmp_path_factory.mktemp(f"pre_{family}")
        parser = main_pretrain.get_args_parser()
        main_pretrain.main(parser.parse_args(argv(data, out, model=model, warmup_epochs=1)))
        runs[family] = out
    return runs


# ----------------------------------------------------------------------------- kills


def run_script(args: list[str], fault: str) -> subprocess.CompletedProcess:
    env = {**env_without_dist(), "MAE_FAULT_INJECT": fault}
    return subprocess.run(
        [sys.executable, "main_pretrain.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_kill_in_a_step_and_in_a_checkpoint_write_then_resume_auto(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = argv(data, out, model="mae_vit_tiny_patch4", epochs=2, warmup_epochs=1, resume="auto")

    # 1. killed in epoch 1, step 1 (global step 3): epoch 0's checkpoints are complete
    proc = run_script(args, "step:3")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "SIGKILL at step 3" in proc.stderr
    assert assert_all_load_weights_only(out) == {"checkpoint-last.pth": 0, "checkpoint-0.pth": 0}
    after_first = checkpoints(out)

    # 2. the same command resumes at epoch 1 and is killed partway through writing epoch 1's checkpoint
    proc = run_script(args, "save:1")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert f"--resume auto: {out / 'checkpoint-last.pth'}" in proc.stderr
    assert "continuing at epoch 1" in proc.stderr
    temp = [p for p in out.iterdir() if p.name.startswith(".checkpoint-last.pth.tmp.")]
    assert len(temp) == 1 and 64 * 1024 <= temp[0].stat().st_size < (out / "checkpoint-last.pth").stat().st_size
    with pytest.raises(Exception):  # noqa: B017 - the torn write is unreadable, whatever the reader says
        load(temp[0])
    assert {k: v for k, v in checkpoints(out).items() if k != temp[0].name} == after_first  # untouched

    # 3. the same command, uninterrupted (in this process): resumes from epoch 0's checkpoint again and finishes
    parsed = main_pretrain.get_args_parser().parse_args(args)
    main_pretrain.main(parsed)
    assert parsed.start_epoch == 1
    assert assert_all_load_weights_only(out) == {"checkpoint-last.pth": 1, "checkpoint-0.pth": 0, "checkpoint-1.pth": 1}
    assert not [p for p in out.iterdir() if ".tmp." in p.name]  # the torn temporary file was removed
    epochs = [line for line in (out / "log.txt").read_text().splitlines()]
    assert len(epochs) == 2 and '"epoch": 0' in epochs[0] and '"epoch": 1' in epochs[1]


def test_torchrun_restarts_a_killed_rank_and_resumes(data: Path, tmp_path: Path) -> None:
    """Rank 1 dies in epoch 1; torchrun restarts both ranks, which resume from epoch 0's checkpoint without a
    ``--resume`` flag (a restart implies ``--resume auto``)."""
    out, marker = tmp_path / "out", tmp_path / "fired"
    env = {**env_without_dist(), "MAE_FAULT_INJECT": "step:3@rank1", "MAE_FAULT_INJECT_ONCE": str(marker)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "--monitor-interval=0.2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "main_pretrain.py",
        *argv(data, out, model="mae_vit_tiny_patch4", epochs=2, warmup_epochs=1, batch_size=2),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert marker.exists() and "SIGKILL at step 3" in proc.stderr  # the fault did fire, on rank 1
    assert "torchrun restart 1: resuming as with --resume auto" in proc.stderr
    assert "continuing at epoch 1" in proc.stderr
    assert assert_all_load_weights_only(out) == {"checkpoint-last.pth": 1, "checkpoint-0.pth": 0, "checkpoint-1.pth": 1}
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and '"epoch": 1' in lines[1]


# ----------------------------------------------------------------------------- unreadable images


def add_bad_images(split: Path) -> list[str]:
    """Four unreadable files among the images of ``split``: random bytes, a truncated JPEG and PNG, a text file."""
    good = next(split.rglob("*.png")).read_bytes()
    jpeg = io.BytesIO()
    Image.fromarray(np.full((36, 36, 3), 90, np.uint8)).save(jpeg, "JPEG")
    bad = {
        "class0/corrupt.jpg": np.random.default_rng(0).bytes(3000),
        "class0/truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "class1/truncated.png": good[: len(good) // 2],
        "class1/notes.jpeg": b"not an image\n",
    }
    for name, content in bad.items():
        (split / name).write_bytes(content)
    return sorted(str(split / name) for name in bad)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """8 good + 4 unreadable training images (3 batches of 4), 4 good + 4 unreadable validation images."""
    root = make_image_folder(tmp_path_factory.mktemp("bad"), per_class=4, val_per_class=2)
    return root, add_bad_images(root / "train"), add_bad_images(root / "val")


def test_unreadable_image_stops_the_run_with_its_name(bad_data, tmp_path: Path, monkeypatch, capsys) -> None:
    root, bad_train, _ = bad_data
    code, err = cli(main_pretrain, argv(root, tmp_path, model="mae_vit_tiny_patch4"), monkeypatch, capsys)
    assert code == 1
    line = error_line(err)
    assert "cannot read image " in line and "--skip_bad_images" in line
    assert any(f"image {path} (" in line for path in bad_train)
    assert not (tmp_path / "checkpoint-last.pth").exists()


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_skip_bad_images_counts_them_and_trains_on(bad_data, tmp_path: Path, script: str, caplog) -> None:
    root, bad_train, bad_val = bad_data
    model = MODELS["mae"][0 if script == "pretrain" else 1]
    extra = dict(nb_classes=2) if script == "finetune" else {}
    module = SCRIPTS[script]
    module.main(module.get_args_parser().parse_args(argv(root, tmp_path, model=model, skip_bad_images=True, **extra)))

    log = [line for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and '"train_skipped_images": 4' in log[0]  # every file is seen once per epoch
    if script == "finetune":
        assert '"test_skipped_images": 4' in log[0]
    assert load(tmp_path / "checkpoint-last.pth")["epoch"] == 0
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    expected = bad_train + (bad_val if script == "finetune" else [])
    assert sorted(m.split(" ")[3] for m in warned) == sorted(expected)  # each named once


@pytest.mark.parametrize("skip", [False, True])
def test_loader_with_workers(bad_data, skip: bool) -> None:
    """Two DataLoader workers: training batches keep their size (the next readable image stands in), evaluation
    leaves unreadable images out, and without skipping the error names the file in one line."""
    root, bad_train, bad_val = bad_data
    args = main_finetune.get_args_parser().parse_args(
        ["--batch_size", "4", "--num_workers", "2", "--no_pin_mem"] + (["--skip_bad_images"] if skip else [])
    )
    train = train_loader(image_folder(str(root / "train"), pretrain_transform(32)), args, torch.device("cpu"))
    val = val_loader(image_folder(str(root / "val"), pretrain_transform(32)), args, torch.device("cpu"))
    if not skip:
        with pytest.raises(BadImageError) as e:
            list(train)
        assert "\n" not in str(e.value) and any(f"image {p} (" in str(e.value) for p in bad_train)
        return
    sizes = [images.shape[0] for images, _ in train]
    assert sizes == [4, 4, 4] and train.skipped == 4
    assert sum(images.shape[0] for images, _ in val) == 4 and val.skipped == 4
    assert {str(p) for p in bad_val} <= val._ever_skipped


def test_data_stats_auto_names_an_unreadable_image_once_or_skips_it(tmp_path, monkeypatch, capsys) -> None:
    """--data_stats auto reads every sampled image: one that cannot be read stops the run with one line naming it
    once (PIL's own message repeats the path) and suggesting --skip_bad_images; with the flag it is left out of the
    statistics, which are then numpy's of the readable images."""
    root = make_image_folder(tmp_path / "data", per_class=4, val_per_class=1)
    bad = root / "train" / "class0" / "bad.png"
    bad.write_bytes(b"not a png")
    flags = dict(model="mae_vit_tiny_patch4", data_stats="auto")
    code, err = cli(main_pretrain, argv(root, tmp_path / "a", **flags), monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    line = error_line(err)
    assert line.count(str(bad)) == 1 and "for --data_stats auto" in line and "pass --skip_bad_images" in line, line

    code, err = cli(main_pretrain, argv(root, tmp_path / "b", skip_bad_images=True, **flags), monkeypatch, capsys)
    assert code == 0, err[-3000:]
    pixels = np.concatenate(
        [np.asarray(Image.open(p), np.float64).reshape(-1, 3) / 255 for p in (root / "train").rglob("[0-9].png")]
    )
    stats = load(tmp_path / "b" / "checkpoint-last.pth")["data_stats"]
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.std(0), rtol=1e-6)


def test_data_stats_auto_on_constant_images_asks_for_mean_and_std(tmp_path, monkeypatch, capsys) -> None:
    """All-black images: every channel's std is 0, which cannot normalise."""
    (tmp_path / "black").mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(tmp_path / "black" / f"{i}.png")
    args = argv(tmp_path / "black", tmp_path / "out", model="mae_vit_tiny_patch4", data_stats="auto")
    code, err = cli(main_pretrain, args, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    line = error_line(err)
    assert "3 of 3 channels are constant over the 4 sampled images (channel 0: 0" in line, line
    assert "give --mean and --std explicitly" in line, line
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


# ----------------------------------------------------------------------------- list files


@pytest.mark.parametrize("kind", ["image", "latin-1"])
def test_a_data_path_that_is_no_list_file_is_one_line(data, tmp_path, monkeypatch, capsys, kind) -> None:
    """An image given as --data_path, or a list file in another encoding than UTF-8: one line saying so."""
    if kind == "image":
        path, message = next((data / "train").rglob("*.png")), "is an image, not a folder or a list file of image"
    else:
        path, message = tmp_path / "list.txt", r"list.txt: line 2 is not UTF-8 text \(byte 0xe9\); save the list as"
        path.write_bytes(b"class0/0.png\n# caf\xe9\n")
    code, err = cli(main_pretrain, argv(path, tmp_path / "out", model="mae_vit_tiny_patch4"), monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert re.search(message, error_line(err)), error_line(err)


def test_skip_bad_images_leaves_out_listed_files_that_do_not_exist(data, tmp_path, monkeypatch, capsys, caplog) -> None:
    """A list of the 8 training images and 5 files that do not exist: without --skip_bad_images one line naming the
    first three; with it one warning counting them, and the run trains on the 8; a list of missing files only is
    one line even with the flag."""
    images = sorted((data / "train").rglob("*.png"))
    (tmp_path / "list.txt").write_text("\n".join([*map(str, images), *(f"gone{i}.png" for i in range(5))]) + "\n")
    flags = dict(model="mae_vit_tiny_patch4")
    code, err = cli(main_pretrain, argv(tmp_path / "list.txt", tmp_path / "a", **flags), monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    line = error_line(err)
    assert re.search(r"do not exist: \S+/gone0.png, \S+/gone1.png, \S+/gone2.png, \.\.\. \(5 in all\)", line), line
    assert "pass --skip_bad_images" in line

    out = tmp_path / "b"
    code, err = cli(main_pretrain, argv(tmp_path / "list.txt", out, skip_bad_images=True, **flags), monkeypatch, capsys)
    assert code == 0, err[-3000:]
    warned = [r.getMessage() for r in caplog.records if "which do not exist" in r.getMessage()]
    assert len(warned) == 1 and "skipping 5 of its 13 files" in warned[0] and "gone0.png" in warned[0], warned
    assert load(out / "checkpoint-last.pth")["epoch"] == 0
    assert '"train_skipped_images": 0' in (out / "log.txt").read_text()  # the 8 listed images, all read

    (tmp_path / "gone.txt").write_text("gone0.png\ngone1.png\n")
    code, err = cli(main_pretrain, argv(tmp_path / "gone.txt", out, skip_bad_images=True, **flags), monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert re.search(r"gone.txt: none of its 2 files exist \(\S+/gone0.png, \S+/gone1.png\)", error_line(err))


# ----------------------------------------------------------------------------- non-finite loss, checkpoints


def test_non_finite_loss_stops_and_leaves_the_checkpoint(pretrained, data, tmp_path, monkeypatch, capsys) -> None:
    """An absurd lr blows the weights up in the first step after resuming; the loss of the next step is not finite."""
    out = tmp_path / "out"
    out.mkdir()
    for p in pretrained["mae"].glob("checkpoint-*.pth"):
        (out / p.name).write_bytes(p.read_bytes())
    before = checkpoints(out)
    args = argv(data, out, model="mae_vit_tiny_patch4", epochs=2, warmup_epochs=1, lr=1e30, resume="auto")
    code, err = cli(main_pretrain, args, monkeypatch, capsys)
    assert code == 1
    line = error_line(err)
    assert "loss is " in line and "at epoch 1, step 1/2 (global step 3)" in line
    assert "lr 5e+29" in line and "amp none" in line and "Hint: lower --blr/--lr" in line
    assert checkpoints(out) == before  # byte-identical


def test_pretraining_checkpoints_load_weights_only(pretrained) -> None:
    for family, out in pretrained.items():
        ckpt = load(out / "checkpoint-last.pth")
        assert ckpt["model_name"] == MODELS[family][0] and ckpt["args"]["model"] == MODELS[family][0]
        assert assert_all_load_weights_only(out) == {"checkpoint-last.pth": 0, "checkpoint-0.pth": 0}


@pytest.mark.parametrize(
    "script, flag, ckpt_family, model, message",
    [
        ("pretrain", "resume", "mae", "mixmim_tiny", "does not fit the model: missing: .+; unexpected: .+"),
        ("pretrain", "resume", "mixmim", "mae_vit_tiny_patch4", "does not fit the model: missing: .+; unexpected: .+"),
        ("finetune", "resume", "mae", "vit_tiny_patch4", "does not fit the model: missing: .+; unexpected: .+"),
        ("pretrain", "finetune", "mae", "mixmim_tiny", "is a ViT \\(MAE\\) checkpoint but the model is MixMIM"),
        ("finetune", "finetune", "mae", "mixmim_tiny_ft", "is a ViT \\(MAE\\) checkpoint but the model is MixMIM"),
        ("finetune", "finetune", "mixmim", "vit_tiny_patch4", "is a MixMIM checkpoint but the model is ViT \\(MAE\\)"),
        ("linprobe", "finetune", "mixmim", "vit_tiny_patch4", "is a MixMIM checkpoint but the model is ViT \\(MAE\\)"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else "",
)
def test_checkpoint_into_the_wrong_model(
    pretrained, data, tmp_path, monkeypatch, capsys, script, flag, ckpt_family, model, message
) -> None:
    ckpt = pretrained[ckpt_family] / "checkpoint-last.pth"
    extra = {} if script == "pretrain" else dict(nb_classes=2)
    code, err = cli(SCRIPTS[script], argv(data, tmp_path, model=model, **{flag: ckpt}, **extra), monkeypatch, capsys)
    assert code == 1
    assert re.search(message, error_line(err)), error_line(err)


class NotPlainData:
    """Any class a file may pickle: unpickling it could run code from the file, so it must never be loaded."""


NO_CHECKPOINT = {  # kind of file: what the one line says
    "json": r"args.json is not a checkpoint \(it looks like JSON text\)",
    "image": r"0.png is not a checkpoint \(it looks like a PNG image\)",
    "object": r"holds a pickled `\S*NotPlainData` object, not plain data; only plain dicts / tensors \(and the "
    r"official argparse.Namespace\) are read",
    "truncated": r"is truncated or corrupt \(RuntimeError: PytorchStreamReader failed reading zip archive",
    "no weights": r"holds no model weights: a dict of \{epoch, args\}",
    "pickle": r"plain.pkl is not a checkpoint \(it looks like a Python pickle that torch.save did not write\)",
}


def no_checkpoint(kind: str, data: Path, pretrained: dict[str, Path], folder: Path) -> Path:
    """A file of ``kind`` (``NO_CHECKPOINT``) in ``folder``, given where a checkpoint is expected."""
    folder.mkdir()
    if kind == "json":
        path = folder / "args.json"
        path.write_text(json.dumps({"model": "mae_vit_tiny_patch4", "epochs": 1}))
    elif kind == "image":
        path = folder / "0.png"
        path.write_bytes((data / "train" / "class0" / "0.png").read_bytes())
    elif kind == "object":
        path = folder / "object.pth"
        torch.save({"model": {"w": torch.ones(2)}, "args": NotPlainData()}, path)
    elif kind == "truncated":
        path = folder / "checkpoint-0.pth"
        whole = (pretrained["mae"] / "checkpoint-0.pth").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "pickle":
        path = folder / "plain.pkl"
        path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}))
    else:
        path = folder / "no_weights.pth"
        torch.save({"epoch": 3, "args": {"model": "mae_vit_tiny_patch4"}}, path)
    return path


def run_visualize(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``visualize.py`` through its command line, in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["visualize.py", *args])
    try:
        runpy.run_path(str(ROOT / "visualize.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "kind, script, flag",
    [
        ("json", "pretrain", "resume"),
        ("json", "knn", "finetune"),
        ("image", "finetune", "finetune"),
        ("object", "visualize", "checkpoint"),
        ("object", "pretrain", "finetune"),
        ("truncated", "finetune", "resume"),
        ("no weights", "linprobe", "finetune"),
        ("pickle", "pretrain", "finetune"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_one_line(
    data, pretrained, tmp_path, monkeypatch, capsys, kind, script, flag
) -> None:
    """Each entry point that reads a checkpoint says in one line what the file is instead, and never suggests
    weights_only=False (which would run code from the file)."""
    path = no_checkpoint(kind, data, pretrained, tmp_path / "given")
    out = tmp_path / "out"
    if script == "visualize":
        code, err = run_visualize(["--checkpoint", str(path), "--output_dir", str(out)], monkeypatch, capsys)
    elif script == "knn":
        args = ["--model", "vit_tiny_patch4", "--finetune", str(path), "--data_path", str(data), "--input_size", "32",
                "--batch_size", "4", "--device", "cpu", "--num_workers", "0"]  # fmt: skip
        code, err = cli(main_knn, args, monkeypatch, capsys)
    else:
        model = MODELS["mae"][0 if script == "pretrain" else 1]
        extra = {} if script == "pretrain" else dict(nb_classes=2)
        code, err = cli(SCRIPTS[script], argv(data, out, model=model, **{flag: path}, **extra), monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    line = error_line(err)
    assert re.search(NO_CHECKPOINT[kind], line), line
    assert str(path) in line and "weights_only" not in line
    assert not list(out.glob("checkpoint-*.pth"))


def test_a_pretraining_checkpoint_given_to_resume_points_to_finetune(data, pretrained, tmp_path, monkeypatch, capsys):
    """--resume continues a run of the same script: a pretraining checkpoint there says what does not fit and that
    --finetune is the flag that starts from it."""
    ckpt = pretrained["mae"] / "checkpoint-last.pth"
    args = argv(data, tmp_path / "out", model=MODELS["mae"][1], nb_classes=2, resume=ckpt)
    code, err = cli(main_finetune, args, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    line = error_line(err)
    assert "does not fit the model: missing" in line and f"with --finetune {ckpt} (--resume continues" in line, line


# ----------------------------------------------------------------------------- bad arguments


def _bad_args_cases() -> list:
    cases = []
    for name in SCRIPTS:
        k = 0 if name == "pretrain" else 1  # pretraining model or classifier
        pre, cls = MODELS["mae"][k], MODELS["mixmim"][k]
        common = [
            (dict(model=pre, input_size=30), "--input_size 30 is not a multiple of 4"),
            (dict(model=cls, input_size=40), f"--model {cls} cannot be built for --input_size 40"),
            (dict(model=cls, input_size=48), f"--model {cls} cannot be built for --input_size 48"),
            (dict(model=pre, batch_size=0), "--batch_size must be at least 1, got 0"),
            (dict(model=pre, accum_iter=0), "--accum_iter must be at least 1, got 0"),
            (dict(model="vit_gigantic"), "unknown .*--model 'vit_gigantic'"),
            (dict(model=pre, data_path="MISSING"), "--data_path .*missing does not exist"),
            (dict(model=pre, resume="MISSING"), "--resume .*missing does not exist"),
            (dict(model=pre, finetune="MISSING"), "--finetune .*missing does not exist"),
            (dict(model=pre, output_dir="UNWRITABLE"), "--output_dir .*a_file/sub is not writable"),
            (dict(model=pre, log_dir="UNWRITABLE"), "--log_dir .*a_file/sub is not writable"),
        ]
        common += [
            (dict(model=pre, seed=-1), "--seed must be >= 0, got -1"),
            (dict(model=pre, device="gpu"), "--device gpu is not a device: use cpu, cuda or cuda:N"),
            (dict(model=pre, lr=-1), "--lr must be > 0, got -1.0"),
            (dict(model=pre, blr=0), "--blr must be > 0, got 0.0"),
            (dict(model=pre, weight_decay=-0.05), "--weight_decay must be >= 0, got -0.05"),
            (dict(model=pre, warmup_epochs=-1), "--warmup_epochs must be >= 0, got -1"),
        ]
        if name == "finetune":
            common += [
                (dict(model=cls, drop_path=1.5), r"--drop_path must be in \[0, 1\), got 1.5"),
                (dict(model=cls, layer_decay=0), "--layer_decay must be > 0, got 0.0"),
                (dict(model=cls, smoothing=1.5), r"--smoothing must be in \[0, 1\), got 1.5"),
                (dict(model=cls, clip_grad=-1), "--clip_grad must be > 0, got -1.0"),
                (dict(model=cls, reprob=2), r"--reprob must be in \[0, 1\], got 2.0"),
                (dict(model=cls, remode="bogus"), "--remode must be pixel, rand or const, got bogus"),
                (dict(model=cls, cutmix_minmax=0.5), "--cutmix_minmax takes MIN MAX with 0 < MIN <= MAX <= 1, got 0.5"),
                (dict(model=cls, aa="bogus"), r"--aa bogus: timm cannot build this augmentation \(Unknown AA policy"),
            ]
        if name == "pretrain":
            common += [(dict(model=pre, mask_ratio=r), r"--mask_ratio must be in \(0, 1\)") for r in (0.0, 1.0, -0.5)]
            common += [(dict(model=cls, mask_ratio=1.5), r"--mask_ratio must be in \(0, 1\)")]
        else:
            common += [(dict(model=pre, nb_classes=0), "--nb_classes must be at least 1, got 0")]
        cases += [
            pytest.param(name, kw, msg, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}")
            for kw, msg in common
        ]
    return cases


@pytest.mark.parametrize("script, overrides, message", _bad_args_cases())
def test_bad_arguments_fail_before_any_work(data, tmp_path, monkeypatch, capsys, script, overrides, message) -> None:
    module = SCRIPTS[script]

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(util.run, "seed_everything", no_work)  # the first thing after start_run's checks
    (tmp_path / "a_file").write_text("")
    paths = {"MISSING": str(tmp_path / "missing"), "UNWRITABLE": str(tmp_path / "a_file" / "sub")}
    overrides = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    out = overrides.pop("output_dir", tmp_path / "out")
    log_dir = overrides.pop("log_dir", out)
    args = argv(data, out, **overrides)
    args[args.index("--log_dir") + 1] = str(log_dir)
    code, err = cli(module, args, monkeypatch, capsys)
    assert code == 1
    assert re.search(message, error_line(err)), error_line(err)
    assert "Traceback" not in err
