"""Checkpoints: atomic writes, --resume auto, and --finetune from official-format checkpoints of both families."""

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from model_table import build_classifier, build_pretrain_model
from util.checkpoint import (
    find_resume_checkpoint,
    load_checkpoint_file,
    load_model_strict,
    load_pretrained,
    resolve_resume,
    save_atomic,
)
from util.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
# loading into a meta-device model copies nothing; that is the point there
pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")


class NotPlainData:
    """A class ``torch.load(weights_only=True)`` must refuse."""


def official_state_dict(asset: str, name: str, drop=()) -> dict[str, torch.Tensor]:
    """Zeros with the shapes of an official checkpoint's keys (index buffers as int64, as they are stored)."""
    shapes = json.loads((ASSETS / asset).read_text())[name]
    return {
        k: torch.zeros(shape, dtype=torch.long if k.endswith("relative_position_index") else torch.float32)
        for k, shape in shapes.items()
        if not k.startswith(drop)
    }


def meta_classifier(name: str, input_size: int, **kw) -> nn.Module:
    """A base-size classifier without memory or init cost: only names and shapes matter for these checks."""
    with torch.device("meta"):
        return build_classifier(name, input_size, num_classes=10, drop_path_rate=0.0, **kw)


def write(tmp_path: Path, state: dict, name: str = "pretrained.pth") -> Path:
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize("global_pool", [True, False])
def test_finetune_from_official_mae_checkpoint(tmp_path: Path, global_pool: bool) -> None:
    state = official_state_dict("mae_official_state_dict_keys.json", "mae_vit_base_patch16")
    model = meta_classifier("vit_base_patch16", 224, global_pool=global_pool)
    missing, unexpected = load_pretrained(model, str(write(tmp_path, state)))

    expected_missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    assert set(missing) == expected_missing
    decoder = {k for k in state if k.startswith("decoder") or k == "mask_token"}
    assert set(unexpected) == decoder | ({"norm.weight", "norm.bias"} if global_pool else set())


def test_finetune_from_official_encoder_only_checkpoint(tmp_path: Path) -> None:
    """``mae_pretrain_vit_base.pth``: the encoder without decoder and head."""
    state = official_state_dict("mae_official_state_dict_keys.json", "vit_base_patch16_cls", drop=("head.",))
    model = meta_classifier("vit_base_patch16", 224, global_pool=True)
    missing, unexpected = load_pretrained(model, str(write(tmp_path, state)))
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(unexpected) == {"norm.weight", "norm.bias"}


def test_finetune_mixmim_at_384_from_official_224_checkpoint(tmp_path: Path) -> None:
    state = official_state_dict("mixmim_official_state_dict_keys.json", "mixmim_base")
    model = meta_classifier("mixmim_base_384", 384)  # the official fine-tuning name
    missing, unexpected = load_pretrained(model, str(write(tmp_path, state)))
    buffers = {n for n, _ in model.named_buffers()}
    assert set(missing) - buffers == {"head.weight", "head.bias"}
    assert {k.rsplit(".", 1)[-1] for k in set(missing) & buffers} == {"relative_position_index"}  # rebuilt
    assert set(unexpected) == {k for k in state if k.startswith("decoder") or k == "mask_token"}
    table = "layers.2.blocks.0.attn.relative_position_bias_table"
    assert model.state_dict()[table].shape == ((2 * 24 - 1) ** 2, 16)  # window 14 -> 24: interpolated


def test_finetune_loads_values_and_inits_the_head(tmp_path: Path) -> None:
    source = build_classifier("vit_tiny_patch4", 32, num_classes=7, drop_path_rate=0.0, global_pool=False)
    model = build_classifier("vit_tiny_patch4", 32, num_classes=3, drop_path_rate=0.0, global_pool=False)
    missing, _ = load_pretrained(model, str(write(tmp_path, source.state_dict())))  # head 7 classes -> 3: dropped
    assert set(missing) == {"head.weight", "head.bias"}
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.state_dict()[k], v), k
    assert 1e-5 < model.head.weight.std().item() < 3e-5  # the official tiny head init, trunc_normal(std=2e-5)


@pytest.mark.parametrize("family", ["mae", "mixmim"])
def test_finetuned_encoder_gives_the_pretrained_features(tmp_path: Path, family: str) -> None:
    """After ``--finetune`` from a pretraining checkpoint, the classifier's encoder computes exactly the pretraining
    encoder's features (no mask): nothing that matters was dropped, renamed or re-initialised."""
    pre_name, ft_name, size = {
        "mae": ("mae_vit_tiny_patch4", "vit_tiny_patch4", 32),
        "mixmim": ("mixmim_tiny", "mixmim_tiny_ft", 64),
    }[family]
    torch.manual_seed(0)
    pretrained = build_pretrain_model(pre_name, size)
    with torch.no_grad():  # move every weight away from its initial value, so that a skipped key would show
        for p in pretrained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = build_classifier(ft_name, size, num_classes=5, drop_path_rate=0.0, global_pool=False)
    load_pretrained(model, str(write(tmp_path, pretrained.state_dict())))
    x = torch.randn(2, 3, size, size)
    pretrained.eval()
    model.eval()
    with torch.no_grad():
        if family == "mae":
            # nothing masked, tokens kept in order: the classifier's tokens are the encoder's
            latent = pretrained.forward_encoder(x, mask_ratio=0.0, noise=torch.arange(64.0).expand(2, 64))[0]
            expected, got = latent, model.forward_features(x)
        else:
            expected, got = pretrained.forward_encoder(x, None), model.forward_encoder(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_finetune_rejects_foreign_keys_and_the_other_family(tmp_path: Path) -> None:
    model = build_classifier("vit_tiny_patch4", 32, num_classes=3, drop_path_rate=0.0, global_pool=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state["extra.weight"] = torch.zeros(2)
    with pytest.raises(UsageError, match="unexpected: extra.weight"):
        load_pretrained(model, str(write(tmp_path, state)))

    mixmim = official_state_dict("mixmim_official_state_dict_keys.json", "mixmim_base")
    with pytest.raises(UsageError, match="MixMIM checkpoint but the model is ViT"):
        load_pretrained(model, str(write(tmp_path, mixmim, "mixmim.pth")))


def test_resume_into_the_wrong_model_lists_the_keys() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).state_dict()
    state["other"] = torch.zeros(1)
    with pytest.raises(UsageError) as e:
        load_model_strict(model, state, "ckpt.pth")
    msg = str(e.value)
    assert "ckpt.pth does not fit" in msg and "unexpected: other" in msg
    assert "0.weight (5, 3) vs (4, 3)" in msg


def test_atomic_save_leaves_the_old_file_when_a_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-last.pth"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled
        save_atomic({"epoch": 2, "bad": lambda: 0}, path)
    assert load_checkpoint_file(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temporary file left


def test_official_checkpoint_with_namespace_loads_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1), "epoch": 3}, path)
    assert load_checkpoint_file(path)["args"].lr == 0.1

    torch.save({"model": {}, "obj": NotPlainData()}, tmp_path / "evil.pth")
    with pytest.raises(UsageError, match="not plain data"):
        load_checkpoint_file(tmp_path / "evil.pth")


def test_a_checkpoint_in_the_legacy_format_loads(tmp_path: Path) -> None:
    """torch.save's format before PyTorch 1.6 (a pickle, not a zip) is a checkpoint, not "a foreign pickle"."""
    path = tmp_path / "legacy.pth"
    weights = torch.arange(6.0).view(2, 3)
    torch.save(
        {"model": {"w": weights}, "args": argparse.Namespace(lr=0.1)}, path, _use_new_zipfile_serialization=False
    )
    assert torch.equal(load_checkpoint_file(path)["model"]["w"], weights)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UsageError, match=r"legacy.pth is truncated or corrupt \(EOFError: the file ends early\)"):
        load_checkpoint_file(path)


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert find_resume_checkpoint(str(tmp_path)) is None
    for epoch in (2, 10):
        save_atomic({"epoch": epoch}, tmp_path / f"checkpoint-{epoch}.pth")
    (tmp_path / ".checkpoint-last.pth.tmp.123").write_bytes(b"partial")
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10.pth")  # 10 > 2, not lexical
    (tmp_path / "checkpoint-last.pth").write_bytes(b"truncated")  # e.g. copied by hand and cut short
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10.pth")
    save_atomic({"epoch": 11}, tmp_path / "checkpoint-last.pth")
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")


def test_resolve_resume(tmp_path: Path) -> None:
    save_atomic({"epoch": 4}, tmp_path / "checkpoint-4.pth")
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path))
    resolve_resume(args)
    assert args.resume == str(tmp_path / "checkpoint-4.pth")

    # the official MixMIM scripts pass --resume OUTPUT_DIR/checkpoint.pth on every launch
    args = argparse.Namespace(resume=str(tmp_path / "checkpoint.pth"), output_dir=str(tmp_path))
    resolve_resume(args)
    assert args.resume == str(tmp_path / "checkpoint-4.pth")

    args = argparse.Namespace(resume=str(tmp_path / "elsewhere" / "x.pth"), output_dir=str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        resolve_resume(args)


def test_eval_resumes_only_the_checkpoint_it_names(tmp_path: Path) -> None:
    """--eval evaluates the --resume checkpoint: a mistyped path inside --output_dir is an error (not the newest
    checkpoint there, as for training), and --resume auto in a folder without checkpoints too (not a randomly
    initialised model)."""
    save_atomic({"epoch": 4}, tmp_path / "checkpoint-4.pth")
    args = argparse.Namespace(resume=str(tmp_path / "checkpoint-9.pth"), output_dir=str(tmp_path), eval=True)
    with pytest.raises(UsageError, match=r"--resume .*checkpoint-9.pth does not exist$"):
        resolve_resume(args)
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path), eval=True)
    resolve_resume(args)
    assert args.resume == str(tmp_path / "checkpoint-4.pth")
    (tmp_path / "empty").mkdir()
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path / "empty"), eval=True)
    with pytest.raises(UsageError, match=r"^--eval --resume auto: no checkpoint in .*empty to evaluate$"):
        resolve_resume(args)
