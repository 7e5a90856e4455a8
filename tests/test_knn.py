"""k-NN evaluation (util/knn.py, main_knn.py): the DINO vote against a brute-force reference, any checkpoint of
either family, and two processes equal one."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from train_utils import make_image_folder, parse, run_torchrun

import main_knn
from model_table import build_classifier, build_pretrain_model
from util.errors import BadImageError
from util.knn import knn_accuracy, knn_classify

ROOT = Path(__file__).resolve().parent.parent


def brute_force(train_f, train_l, test_f, k: int, temperature: float, num_classes: int) -> list[list[int]]:
    """For each test vector: the classes that got votes, by summed exp(cos / T) over its k most similar training
    vectors, written as plain loops."""
    ranked = []
    for q in test_f.tolist():
        sims = [sum(a * b for a, b in zip(q, t, strict=True)) for t in train_f.tolist()]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(train_l[i])] += math.exp(sims[i] / temperature)
        voted = sorted((c for c in range(num_classes) if votes[c] > 0), key=lambda c: -votes[c])
        ranked.append(voted)  # classes without a vote are tied at 0: their order is arbitrary
    return ranked


@pytest.mark.parametrize("k", [1, 5, 20])
def test_the_vote_equals_a_brute_force_reference(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    train_f = torch.nn.functional.normalize(torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    test_f = torch.nn.functional.normalize(torch.randn(25, 8, generator=g, dtype=torch.float64), dim=1)
    train_l = torch.randint(0, 7, (60,), generator=g)
    ours = knn_classify(train_f, train_l, test_f, [k], temperature=0.07, num_classes=7, chunk=10)[k]
    reference = brute_force(train_f, train_l, test_f, k, 0.07, 7)
    assert [o[: len(r[:5])] for o, r in zip(ours.tolist(), reference, strict=True)] == [r[:5] for r in reference]
    assert any(len(r) > 1 for r in reference) or k == 1  # the weights decide an order, not only the top class


def test_accuracy_counts_top1_and_top5() -> None:
    # two training points per class on a circle; each test point sits on one training point of its class
    angles = torch.arange(12, dtype=torch.float64) * (2 * math.pi / 12)
    train_f = torch.stack([angles.cos(), angles.sin()], dim=1)
    train_l = torch.arange(12) // 2  # classes 0..5
    stats = knn_accuracy(train_f, train_l, train_f[::2], torch.tensor([0, 1, 2, 3, 4, 0]), [1, 12], num_classes=6)
    assert stats["knn_k1_acc1"] == pytest.approx(100 * 5 / 6)  # the last test point (class 5) is labelled 0
    assert stats["knn_k12_acc1"] == pytest.approx(100 * 5 / 6)
    # with all 12 voting, that point (at 300 degrees) ranks classes 5, 4, 0 (at 0 and 30 degrees), ...: 0 is top-5
    assert stats["knn_k12_acc5"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "model, kind", [("vit_tiny_patch4", "pretrain"), ("mixmim_tiny", "pretrain"), ("vit_tiny_patch4", "finetuned")]
)
def test_main_knn_on_two_ranks_equals_one_process(tmp_path: Path, model: str, kind: str) -> None:
    """Pretraining (MAE, MixMIM) and fine-tuned (global-pool ViT, found from its fc_norm) checkpoints; the features
    of two processes, gathered in dataset order, equal one process's, and so do the accuracies."""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=5, val_per_class=3)  # 15 and 9: uneven shards
    torch.manual_seed(0)
    if kind == "pretrain":
        net = build_pretrain_model({"vit_tiny_patch4": "mae_vit_tiny_patch4"}.get(model, model), 32)
    else:
        net = build_classifier(model, 32, 3, 0.0, global_pool=True)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": net.state_dict()}, ckpt)
    flags = dict(model=model, finetune=ckpt, data_path=data, input_size=32, batch_size=4, device="cpu", num_workers=0)

    one = tmp_path / "one"
    args = parse(main_knn.get_args_parser(), **flags, output_dir=one, save_features=one)
    args.nb_knn = [1, 3]
    single = main_knn.main(args)
    assert json.loads((one / "knn.json").read_text()) == single
    assert set(single) == {"knn_k1_acc1", "knn_k1_acc5", "knn_k3_acc1", "knn_k3_acc5"}

    two = tmp_path / "two"
    cli = ["main_knn.py", "--nb_knn", "1", "3"]
    for key, value in {**flags, "output_dir": two, "save_features": two}.items():
        cli += [f"--{key}", str(value)]
    proc = run_torchrun(cli, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "knn.json").read_text()) == pytest.approx(single)
    a, b = (torch.load(d / "features.pt", weights_only=True) for d in (one, two))
    assert len(a["train_features"]) == 15 and len(a["val_features"]) == 9
    for key in ("train_labels", "val_labels"):
        assert torch.equal(a[key], b[key])
    for key in ("train_features", "val_features"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
        torch.testing.assert_close(a[key].norm(dim=1), torch.ones(len(a[key])), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "pre, clf, size",
    [("mae_vit_tiny_patch4", "vit_tiny_patch4", 32), ("mixmim_tiny", "mixmim_tiny", 32),
     ("mae_vit_tiny_patch4", "vit_tiny_patch4", [32, 48])],
)  # fmt: skip
def test_knn_during_pretraining_equals_main_knn_on_the_checkpoint(
    tmp_path: Path, pre: str, clf: str, size, monkeypatch
):
    """--knn_freq 1: every epoch's log line and TensorBoard get the k-NN of the encoder; the last one (its features
    and its accuracy) equals main_knn.py on the checkpoint that epoch wrote (a separate path: the weights go
    through the file). Also for non-square images (--input_size 32 48)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train_utils import tiny_run_args

    import main_pretrain
    import util.knn

    data = make_image_folder(tmp_path / "data", classes=3, per_class=4, val_per_class=2)
    out = tmp_path / "pre"
    args = parse(
        main_pretrain.get_args_parser(), **tiny_run_args(data, out, model=pre, epochs=2, warmup_epochs=1, knn_freq=1)
    )
    args.nb_knn, args.input_size = [3], size
    seen = []
    real = util.knn.knn_accuracy
    monkeypatch.setattr(util.knn, "knn_accuracy", lambda *a, **k: (seen.append(a[0].clone()), real(*a, **k))[1])
    main_pretrain.main(args)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])  # the encoder's weights changed in between
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [("knn_k3_acc1" in line, "knn_k3_acc5" in line) for line in lines] == [(True, True)] * 2
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("knn/knn_k3_acc1")] == [0, 1]

    kargs = parse(
        main_knn.get_args_parser(), model=clf, finetune=out / "checkpoint-last.pth", data_path=data,
        batch_size=4, device="cpu", num_workers=0, save_features=tmp_path,
    )  # fmt: skip
    kargs.nb_knn, kargs.input_size = [3], size
    assert main_knn.main(kargs) == {k: lines[-1][k] for k in ("knn_k3_acc1", "knn_k3_acc5")}
    saved = torch.load(tmp_path / "features.pt", weights_only=True)["train_features"]
    torch.testing.assert_close(seen[-1], saved, rtol=0, atol=1e-6)


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    """Every image counts in a k-NN evaluation: an unreadable file stops it with the file's name (one line from the
    CLI), as in training."""
    from util.errors import BadImageError

    data = make_image_folder(tmp_path / "data", classes=2, per_class=2, val_per_class=2)
    bad = data / "val" / "class1" / "broken.png"
    bad.write_bytes(b"not an image")
    args = parse(main_knn.get_args_parser(), model="vit_tiny_patch4", data_path=data, input_size=32, batch_size=2,
                 device="cpu", num_workers=0)  # fmt: skip
    with pytest.raises(BadImageError, match=f"cannot read image {bad}"):
        main_knn.main(args)


@pytest.mark.parametrize(
    "model, layer, module", [("vit_tiny_patch4", 2, "blocks.2"), ("mixmim_tiny", 1, "layers.1.blocks.0")]
)
def test_layer_features_are_the_mean_of_that_blocks_map(tmp_path: Path, model: str, layer: int, module: str) -> None:
    """--layer: each image's feature is the average over positions of the block's (ViT: patch tokens, without the
    cls token) or stage's (MixMIM: before its merging) output, read by a hook during a plain forward."""
    from model_table import resolve_classifier_name
    from util.datasets import eval_transform, image_folder
    from util.errors import UsageError

    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, val_per_class=2)
    torch.manual_seed(0)
    net = build_pretrain_model({"vit_tiny_patch4": "mae_vit_tiny_patch4"}.get(model, model), 32)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": net.state_dict()}, ckpt)
    flags = dict(model=model, finetune=ckpt, data_path=data, input_size=32, batch_size=4, device="cpu", num_workers=0)
    args = parse(main_knn.get_args_parser(), **flags, save_features=tmp_path, layer=layer)
    args.nb_knn = [1]
    main_knn.main(args)
    saved = torch.load(tmp_path / "features.pt", weights_only=True)["train_features"]

    eargs = parse(main_knn.get_args_parser(), **flags)
    eargs.model_name = resolve_classifier_name(model)
    encoder = main_knn.build_encoder(eargs, torch.device("cpu"))
    seen = []
    encoder.get_submodule(module).register_forward_hook(lambda _m, _i, out: seen.append(out))
    images = torch.stack([x for x, _ in image_folder(str(data / "train"), eval_transform(32))])
    with torch.no_grad():
        encoder(images)
    tokens = seen[0][:, 1:] if model.startswith("vit") else seen[0]  # (N, L, D)
    expected = torch.nn.functional.normalize(tokens.mean(dim=1), dim=1)
    torch.testing.assert_close(saved, expected, rtol=0, atol=1e-5)

    with pytest.raises(UsageError, match="--layer 9 is not one of the"):
        main_knn.main(parse(main_knn.get_args_parser(), **flags, layer=9))


def test_skip_bad_images_leaves_them_out_on_one_and_two_ranks(tmp_path: Path, caplog) -> None:
    """--skip_bad_images: unreadable files are left out of the vote, counted in knn.json, and the features, labels
    and accuracies equal those of the same folder without them, on one process and on two. On two, every training
    image of rank 0's shard is unreadable (the even indices), and so is the first image, which the sampler's
    padding repeats on rank 1. --print_freq sets the progress lines."""
    clean = make_image_folder(tmp_path / "clean", classes=3, per_class=3, val_per_class=2)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=3, val_per_class=2)  # the same images
    train, val = data / "train", data / "val"
    # sorted per class: [-first,] 0, 0b, 1, 1b, 2, 2b: indices 0, 2, ..., 18 unreadable, the 9 images at 1, 3, ..., 17
    bad = [train / "class0" / "-first.png"]
    bad += [train / f"class{c}" / f"{i}b.png" for c in range(3) for i in range(3)]
    for k, path in enumerate(bad):  # not images, and truncated PNGs
        path.write_bytes(b"not an image" if k % 2 else (train / "class2" / "0.png").read_bytes()[:200])
    bad.append(val / "class1" / "notes.png")
    bad[-1].write_bytes(b"not an image either")
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": build_pretrain_model("mae_vit_tiny_patch4", 32).state_dict()}, ckpt)
    flags = dict(model="vit_tiny_patch4", finetune=ckpt, input_size=32, batch_size=4, device="cpu", num_workers=0)

    def run(name: str, **kw) -> tuple[dict, dict]:
        args = parse(
            main_knn.get_args_parser(), **flags, **kw, output_dir=tmp_path / name, save_features=tmp_path / name
        )
        args.nb_knn = [1, 3]
        return main_knn.main(args), torch.load(tmp_path / name / "features.pt", weights_only=True)

    def progress(root: Path) -> int:
        return sum(r.getMessage().startswith(f"features of {root}: [") for r in caplog.records)

    with caplog.at_level("INFO"):
        reference, expected = run("clean", data_path=clean, print_freq=2)
        stats, one = run("one", data_path=data, skip_bad_images=True, print_freq=1)
    assert progress(clean / "train") == 2 and progress(data / "train") == 5  # 3 batches: steps 0, 2; 5: 0 to 4
    assert stats == {**reference, "train_skipped_images": 10, "val_skipped_images": 1}
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert sorted(m.split(" ")[3] for m in warned) == sorted(map(str, bad))

    cli = ["main_knn.py", "--nb_knn", "1", "3", "--skip_bad_images", "--data_path", str(data)]
    for key, value in {**flags, "output_dir": tmp_path / "two", "save_features": tmp_path / "two"}.items():
        cli += [f"--{key}", str(value)]
    proc = run_torchrun(cli, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "knn.json").read_text()) == pytest.approx(stats)
    two = torch.load(tmp_path / "two" / "features.pt", weights_only=True)
    for got in (one, two):
        assert [len(got[k]) for k in ("train_features", "val_features")] == [9, 6]
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)


def test_a_set_without_a_readable_image_is_a_one_line_error(tmp_path: Path) -> None:
    """--skip_bad_images with no readable image in a set: one error naming it (raised after the ranks agree on it)."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2, val_per_class=1)
    for path in (data / "val").rglob("*.png"):
        path.write_bytes(b"not an image")
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": build_pretrain_model("mae_vit_tiny_patch4", 32).state_dict()}, ckpt)
    flags = dict(model="vit_tiny_patch4", finetune=ckpt, data_path=data, input_size=32, batch_size=2, device="cpu")
    args = parse(main_knn.get_args_parser(), **flags, num_workers=0, skip_bad_images=True, output_dir=tmp_path / "o")
    with pytest.raises(BadImageError, match=rf"^{re.escape(str(data / 'val'))}: no readable image \(none of its 2"):
        main_knn.main(args)


@pytest.mark.parametrize("flag", [["--compile"], ["--compile_mode", "default"], ["--save_every_min", "1"],
                                  ["--save_every_steps", "1"]])  # fmt: skip
def test_training_only_flags_are_not_offered(flag: list[str], capsys) -> None:
    """k-NN compiles nothing and writes no checkpoints: the flags that would do so are refused by the parser."""
    with pytest.raises(SystemExit):
        main_knn.get_args_parser().parse_args(flag)
    assert f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


def test_knn_during_pretraining_skips_bad_images(tmp_path: Path, caplog) -> None:
    """main_pretrain.py --knn_freq --skip_bad_images: an unreadable k-NN image is left out (named once), not the
    end of the run."""
    from train_utils import tiny_run_args

    import main_pretrain

    data = make_image_folder(tmp_path / "data", classes=2, per_class=2, val_per_class=2)
    bad = data / "val" / "class1" / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "pre"
    flags = tiny_run_args(data, out, model="mae_vit_tiny_patch4", epochs=1, warmup_epochs=0, knn_freq=1, batch_size=2)
    args = parse(main_pretrain.get_args_parser(), **flags, skip_bad_images=True)
    args.nb_knn = [3]
    main_pretrain.main(args)
    assert "knn_k3_acc1" in json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert any(r.getMessage().startswith(f"skipping unreadable image {bad} (") for r in caplog.records)
