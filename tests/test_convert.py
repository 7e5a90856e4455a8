"""convert.py and the formats it reads and writes, with the real ``transformers`` and ``timm`` as the clients.

Every model's weights are perturbed away from their initialisation (LayerNorms start at weight 1, bias 0, so two
swapped norms would otherwise look alike). Hugging Face configs here use a LayerNorm eps of 1e-3, neither the
official 1e-6 nor HF's 1e-12, so that a converter that drops the eps gives other outputs.
"""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from train_utils import make_image_folder, parse, tiny_run_args

import main_finetune
import main_knn
from convert import convert
from convert import get_args_parser as convert_parser
from convert import main as convert_main
from model_table import build_classifier, build_pretrain_model, pretrain_overrides
from models_backbone import detection_backbone
from util.checkpoint import load_checkpoint_file, load_model_strict, load_pretrained, saved_norm_eps, state_dict_of
from util.errors import UsageError
from visualize import load_pretrain_checkpoint

transformers = pytest.importorskip("transformers")

TINY_HF = dict(  # mae_vit_tiny_patch4 in Hugging Face's terms
    hidden_size=192,
    num_hidden_layers=6,
    num_attention_heads=3,
    intermediate_size=768,
    image_size=32,
    patch_size=4,
)
TINY_HF_DECODER = dict(
    decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=512
)
STATS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def our_mae(norm_pix_loss: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb(build_pretrain_model("mae_vit_tiny_patch4", 32, norm_pix_loss=norm_pix_loss))


def save_ours(model: torch.nn.Module, path: Path, name: str, input_size: int = 32, **args) -> Path:
    torch.save(
        {"model": model.state_dict(), "model_name": name, "epoch": 7, "data_stats": STATS,
         "args": {"model": name, "input_size": input_size, "in_chans": 3, **args}},
        path,
    )  # fmt: skip
    return path


def hf_mae(norm_pix_loss: bool, eps: float = 1e-3) -> torch.nn.Module:
    torch.manual_seed(1)
    config = transformers.ViTMAEConfig(**TINY_HF, **TINY_HF_DECODER, layer_norm_eps=eps, norm_pix_loss=norm_pix_loss)
    return perturb(transformers.ViTMAEForPreTraining(config), seed=1)


def same_run(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """The same images and noise give the identical mask, the loss within 1e-6 relative, the reconstruction within
    1e-5."""
    torch.manual_seed(2)
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    with torch.no_grad():
        loss, pred, mask = ours(x, 0.75, noise)
        out = hf(pixel_values=x, noise=noise)
    assert torch.equal(out.mask, mask)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(out.logits, pred, rtol=0, atol=1e-5)


def loads_cleanly(cls, folder: Path) -> torch.nn.Module:
    """``cls.from_pretrained(folder)`` reporting no missing, unexpected or mismatched keys."""
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def rebuilt_mae(path: Path) -> torch.nn.Module:
    """Our pretraining model as the scripts build it from a checkpoint: name, input size, norm_pix_loss and the
    factory keywords its arguments state (the decoder, the LayerNorm eps)."""
    checkpoint = load_checkpoint_file(path)
    args = checkpoint["args"]
    model = build_pretrain_model(
        checkpoint["model_name"], args["input_size"], norm_pix_loss=args["norm_pix_loss"], **pretrain_overrides(args)
    )
    load_model_strict(model, state_dict_of(checkpoint), str(path))
    return model.eval()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- MAE pretraining <-> ViTMAEForPreTraining


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_ours_in_transformers_same_mask_loss_reconstruction(tmp_path: Path, norm_pix_loss: bool) -> None:
    ours = our_mae(norm_pix_loss)
    src = save_ours(ours, tmp_path / "ours.pth", "mae_vit_tiny_patch4", norm_pix_loss=norm_pix_loss, mask_ratio=0.75)
    assert convert(str(src), str(tmp_path / "hf"), "hf") == "Hugging Face ViTMAEForPreTraining"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["norm_pix_loss"] is norm_pix_loss
    assert json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["image_mean"] == STATS["mean"]
    same_run(ours, loads_cleanly(transformers.ViTMAEForPreTraining, tmp_path / "hf"))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_a_transformers_model_here_and_back(tmp_path: Path, norm_pix_loss: bool) -> None:
    hf = hf_mae(norm_pix_loss)
    hf.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "ours.pth"), "official")
    checkpoint = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert checkpoint["model_name"] == "mae_vit_tiny_patch4"
    assert checkpoint["args"]["layer_norm_eps"] == 1e-3 and checkpoint["args"]["norm_pix_loss"] is norm_pix_loss
    ours = rebuilt_mae(tmp_path / "ours.pth")
    assert ours.norm.eps == ours.decoder_norm.eps == ours.blocks[0].norm1.eps == 1e-3
    same_run(ours, hf)

    convert(str(tmp_path / "ours.pth"), str(tmp_path / "back"), "hf")
    back = loads_cleanly(transformers.ViTMAEForPreTraining, tmp_path / "back")
    assert_same_tensors(back.state_dict(), hf.state_dict())  # bit-exact
    assert back.config.layer_norm_eps == 1e-3 and back.config.norm_pix_loss is norm_pix_loss
    same_run(ours, back)


def test_the_hub_key_names_and_those_of_transformers_5_read_alike(tmp_path: Path) -> None:
    """The hub's files name q / k / v ``attention.attention.query``; transformers 5 names them ``q_proj``."""
    hf = hf_mae(False)
    hf.save_pretrained(tmp_path / "saved")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    assert any(".q_proj." in k for k in hf.state_dict())
    a = state_dict_of(load_checkpoint_file(tmp_path / "saved"))
    b = state_dict_of(load_checkpoint_file(tmp_path / "model.safetensors"))  # a model.safetensors with config beside
    assert_same_tensors(a, b)


# ----------------------------------------------------------------------------- classifiers


def test_cls_token_classifier_to_transformers_and_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = perturb(build_classifier("vit_tiny_patch4", 32, 5, 0.0, global_pool=False))
    src = save_ours(ours, tmp_path / "ft.pth", "vit_tiny_patch4")
    assert convert(str(src), str(tmp_path / "hf"), "hf") == "Hugging Face ViTForImageClassification"
    hf = loads_cleanly(transformers.ViTForImageClassification, tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ours(x), rtol=0, atol=1e-5)
    convert(str(tmp_path / "hf"), str(tmp_path / "back.pth"), "official")
    assert_same_tensors(torch.load(tmp_path / "back.pth", weights_only=True)["model"], ours.state_dict())


def test_a_transformers_classifier_here(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(**TINY_HF, num_labels=4)  # HF's default eps, 1e-12
    hf = perturb(transformers.ViTForImageClassification(config))
    hf.save_pretrained(tmp_path / "hf")
    eps = saved_norm_eps(str(tmp_path / "hf"))
    assert eps == 1e-12
    ours = build_classifier("vit_tiny_patch4", 32, 4, 0.0, global_pool=False, layer_norm_eps=eps).eval()
    load_model_strict(ours, state_dict_of(load_checkpoint_file(tmp_path / "hf")), "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=0, atol=1e-5)


def test_the_global_pool_classifier_has_no_hugging_face_class(tmp_path: Path) -> None:
    ours = build_classifier("vit_tiny_patch4", 32, 5, 0.0, global_pool=True)
    src = save_ours(ours, tmp_path / "ft.pth", "vit_tiny_patch4")
    with pytest.raises(UsageError, match="global-pool fine-tuned ViT .* has no Hugging Face class: --to timm"):
        convert(str(src), str(tmp_path / "hf"), "hf")
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- round trips


def checkpoints(tmp_path: Path) -> dict[str, Path]:
    """A pretraining and a fine-tuned checkpoint of each family, ours, with arguments and statistics."""
    torch.manual_seed(0)
    made = {
        "mae": (build_pretrain_model("mae_vit_tiny_patch4", 32), "mae_vit_tiny_patch4", 32),
        "vit": (build_classifier("vit_tiny_patch4", 32, 5, 0.0, global_pool=True), "vit_tiny_patch4", 32),
        "mixmim": (build_pretrain_model("mixmim_tiny", 64), "mixmim_tiny", 64),
        "mixmim_ft": (build_classifier("mixmim_tiny_ft", 64, 5, 0.0), "mixmim_tiny_ft", 64),
    }
    return {k: save_ours(perturb(m), tmp_path / f"{k}.pth", name, size) for k, (m, name, size) in made.items()}


@pytest.mark.parametrize(
    "kind, formats",
    [
        ("mae", ["safetensors", "hf", "official"]),
        ("vit", ["safetensors", "timm", "official"]),
        ("mixmim", ["safetensors", "official"]),
        ("mixmim_ft", ["safetensors", "official"]),
    ],
)
def test_round_trips_are_bit_exact(tmp_path: Path, kind: str, formats: list[str]) -> None:
    src = checkpoints(tmp_path)[kind]
    original = torch.load(src, weights_only=True)
    path = src
    for i, to in enumerate(formats):
        dst = tmp_path / f"step{i}_{to}{'.safetensors' if to == 'safetensors' else '.pth' if to == 'official' else ''}"
        convert(str(path), str(dst), to)
        path = dst
        assert_same_tensors(state_dict_of(load_checkpoint_file(dst)), original["model"])
    final = torch.load(path, weights_only=True)
    assert final["model_name"] == original["model_name"]
    if "hf" not in formats and "timm" not in formats:  # the safetensors metadata keeps all the scripts need
        assert final["args"] == original["args"] and final["data_stats"] == STATS and final["epoch"] == 7


def test_safetensors_metadata(tmp_path: Path) -> None:
    src = checkpoints(tmp_path)["mixmim"]
    convert(str(src), str(tmp_path / "m.safetensors"), "safetensors")
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert {k: json.loads(meta[k]) for k in ("model_name", "input_size", "in_chans", "mean", "std", "epoch")} == {
        "model_name": "mixmim_tiny", "input_size": 64, "in_chans": 3, "mean": STATS["mean"], "std": STATS["std"],
        "epoch": 7,
    }  # fmt: skip


def test_encoder_only_is_the_released_layout(tmp_path: Path) -> None:
    src = checkpoints(tmp_path)["mae"]
    convert(str(src), str(tmp_path / "enc.pth"), "official", encoder_only=True)
    saved = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert list(saved) == ["model"]
    keys = set(saved["model"])
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.5.mlp.fc2.bias"} <= keys
    assert not any(k.startswith("decoder") or k == "mask_token" for k in keys)


def test_a_non_square_mae_has_no_hugging_face_grid(tmp_path: Path) -> None:
    model = build_pretrain_model("mae_vit_tiny_patch4", (32, 48))
    src = save_ours(model, tmp_path / "wide.pth", "mae_vit_tiny_patch4", input_size=[32, 48])
    with pytest.raises(UsageError, match="input size 32x48: Hugging Face's ViTMAE builds a square position grid"):
        convert(str(src), str(tmp_path / "hf"), "hf")
    convert(str(src), str(tmp_path / "wide.safetensors"), "safetensors")
    assert load_checkpoint_file(tmp_path / "wide.safetensors")["args"]["input_size"] == [32, 48]


def test_mixmim_to_hf_or_timm_is_refused_in_one_line(tmp_path: Path) -> None:
    src = checkpoints(tmp_path)["mixmim"]
    for to, name in (("hf", "Hugging Face"), ("timm", "timm")):
        with pytest.raises(UsageError, match=f"{name} has no MixMIM model: --to safetensors"):
            convert(str(src), str(tmp_path / to), to)


def test_bad_sources_and_destinations(tmp_path: Path) -> None:
    src = checkpoints(tmp_path)["mae"]
    with pytest.raises(UsageError, match="exists: give a new path"):
        convert(str(src), str(src), "safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="is a folder, but not a Hugging Face or timm model folder"):
        convert(str(tmp_path / "empty"), str(tmp_path / "x.pth"), "official")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(UsageError, match=r"a.json is not a checkpoint \(it looks like JSON text\)"):
        convert(str(tmp_path / "a.json"), str(tmp_path / "x.pth"), "official")
    convert(str(src), str(tmp_path / "ok.safetensors"), "safetensors")
    whole = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UsageError, match="torn.safetensors is a truncated or corrupt safetensors file"):
        convert(str(tmp_path / "torn.safetensors"), str(tmp_path / "x.pth"), "official")
    with pytest.raises(UsageError, match="--model vit_base_patch16 does not have the shapes"):
        convert(str(src), str(tmp_path / "y.pth"), "official", model_name="vit_base_patch16")
    args = convert_parser().parse_args([str(src), str(tmp_path / "z.safetensors"), "--to", "safetensors"])
    assert convert_main(args) == "safetensors with metadata"


# ----------------------------------------------------------------------------- timm


def test_timm_builds_its_own_vit_from_the_timm_folder(tmp_path: Path) -> None:
    paths = checkpoints(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    convert(str(paths["mae"]), str(tmp_path / "enc"), "timm")  # the encoder, as timm's vit_*_224.mae weights
    theirs = timm.create_model(f"local-dir:{tmp_path / 'enc'}", pretrained=True).eval()
    assert type(theirs) is timm.models.vision_transformer.VisionTransformer  # timm's class, not this project's
    ours = build_classifier("vit_tiny_patch4", 32, 0, 0.0, global_pool=False)
    load_pretrained(ours, str(paths["mae"]), head_init_std=None)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), ours.eval().forward_features(x), rtol=0, atol=1e-6)

    convert(str(paths["vit"]), str(tmp_path / "ft"), "timm")  # a global-pool fine-tuned classifier with its head
    theirs = timm.create_model(f"local-dir:{tmp_path / 'ft'}", pretrained=True).eval()
    ours = build_classifier("vit_tiny_patch4", 32, 5, 0.0, global_pool=True)
    load_model_strict(ours, torch.load(paths["vit"], weights_only=True)["model"], "vit")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours.eval()(x), rtol=0, atol=1e-6)
    assert list(theirs.pretrained_cfg["mean"]) == STATS["mean"]


# ----------------------------------------------------------------------------- every place that takes a checkpoint


def test_every_checkpoint_taking_place_reads_a_hugging_face_folder(tmp_path: Path) -> None:
    hf = hf_mae(False, eps=1e-12)  # the hub's configs: HF's default eps
    hf.save_pretrained(tmp_path / "hf")
    expected = state_dict_of(load_checkpoint_file(tmp_path / "hf"))

    model = load_pretrain_checkpoint(str(tmp_path / "hf"), model_name="mae_vit_tiny_patch4")  # visualize.py
    assert model.norm.eps == 1e-12
    same_run(model.eval(), hf)

    vit = timm.create_model(  # timm's pretrained_cfg file: HF's model.safetensors
        "vit_tiny_patch4", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "hf" / "model.safetensors"))
    )
    assert torch.equal(vit.state_dict()["blocks.3.attn.qkv.weight"], expected["blocks.3.attn.qkv.weight"])

    backbone = detection_backbone("vit_tiny_patch4", str(tmp_path / "hf"), out_channels=16)
    assert torch.equal(backbone.vit.state_dict()["blocks.2.attn.proj.weight"], expected["blocks.2.attn.proj.weight"])
    assert backbone.vit.blocks[0].norm1.eps == 1e-12


def test_a_hugging_face_folder_fine_tunes_and_evaluates(tmp_path: Path) -> None:
    """``main_finetune.py --finetune path/to/hf-folder``, then ``--eval --resume`` of what it wrote; the model is
    built with the folder's LayerNorm eps and keeps it."""
    hf_mae(False, eps=1e-12).save_pretrained(tmp_path / "hf")
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    out = tmp_path / "ft"
    args = parse(
        main_finetune.get_args_parser(),
        **tiny_run_args(data, out, model="vit_tiny_patch4", epochs=1, finetune=tmp_path / "hf", nb_classes=2),
    )
    main_finetune.main(args)
    checkpoint = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert checkpoint["args"]["layer_norm_eps"] == 1e-12
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    args = parse(
        main_finetune.get_args_parser(),
        **tiny_run_args(data, tmp_path / "eval", model="vit_tiny_patch4", eval=True, resume=out / "checkpoint-0.pth"),
    )
    stats = main_finetune.main(args)
    assert args.layer_norm_eps == 1e-12
    assert stats["acc1"] == pytest.approx(last["test_acc1"]) and stats["loss"] == pytest.approx(last["test_loss"])


def test_knn_and_resume_read_safetensors_as_the_pth(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    src = checkpoints(tmp_path)["vit"]
    convert(str(src), str(tmp_path / "ft.safetensors"), "safetensors")
    results = []
    for path in (src, tmp_path / "ft.safetensors"):
        knn = main_knn.main(
            parse(
                main_knn.get_args_parser(),
                **tiny_run_args(
                    data, tmp_path / f"knn_{path.suffix[1:]}", model="vit_tiny_patch4", finetune=path, log_dir=None
                ),
                nb_knn=3,
            )  # fmt: skip
        )
        ev = main_finetune.main(
            parse(
                main_finetune.get_args_parser(),
                **tiny_run_args(data, tmp_path / path.suffix[1:], model="vit_tiny_patch4", eval=True, resume=path),
            )  # fmt: skip
        )
        results.append((knn, ev))
    assert results[0] == results[1]


HUB_CONFIGS = {  # the config.json of facebook/vit-mae-{base,large,huge} on the hub (their eps aside: 1e-12 there)
    "mae_vit_base_patch16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                 patch_size=16),
    "mae_vit_large_patch16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, patch_size=16),
    "mae_vit_huge_patch14": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                 intermediate_size=5120, patch_size=14),
}  # fmt: skip


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_the_released_sizes_get_the_hub_configs(name: str) -> None:
    """B / L / H (on the meta device: shapes only) are told apart by their shapes and get the hub's configs."""
    from convert import identify
    from util.formats import hf_config

    with torch.device("meta"):
        state = build_pretrain_model(name, 224).state_dict()
    found, model = identify(state, {}, "mae", None)
    assert found == name
    config = hf_config("ViTMAEForPreTraining", state, {}, model.blocks[0].attn.num_heads,
                       model.decoder_blocks[0].attn.num_heads)  # fmt: skip
    expected = {**HUB_CONFIGS[name], "image_size": 224, "num_channels": 3, "decoder_hidden_size": 512,
                "decoder_num_hidden_layers": 8, "decoder_num_attention_heads": 16, "decoder_intermediate_size": 2048,
                "mask_ratio": 0.75, "norm_pix_loss": False, "layer_norm_eps": 1e-6, "qkv_bias": True,
                "hidden_act": "gelu", "model_type": "vit_mae"}  # fmt: skip
    assert {k: config[k] for k in expected} == expected


def test_a_folder_timm_writes_is_read_here(tmp_path: Path) -> None:
    """timm's own MAE encoder (as ``vit_*_224.mae``: no head), saved by timm's hub writer, loads here and converts to
    the official layout bit-exactly."""
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    args = dict(patch_size=4, img_size=32, depth=6, num_classes=0)
    theirs = perturb(timm.create_model("vit_tiny_patch16_224", **args))
    save_for_hf(theirs, str(tmp_path / "timm"), model_args=args, safe_serialization=True)
    convert(str(tmp_path / "timm"), str(tmp_path / "ours.pth"), "official")
    checkpoint = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert checkpoint["model_name"] == "vit_tiny_patch4"
    assert_same_tensors(checkpoint["model"], theirs.state_dict())
    ours = build_classifier("vit_tiny_patch4", 32, 3, 0.0, global_pool=False)
    load_pretrained(ours, str(tmp_path / "timm"), head_init_std=None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().forward_features(x), theirs.forward_features(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- what does not fit, in one line


def test_an_official_training_checkpoint_with_a_namespace(tmp_path: Path) -> None:
    """The official scripts pickle their arguments as a Namespace; the official release files state no input size:
    the metadata then takes the model's."""
    import argparse

    ours = build_pretrain_model("mae_vit_tiny_patch4", 32)
    args = argparse.Namespace(model="mae_vit_tiny_patch4", norm_pix_loss=True)
    torch.save({"model": ours.state_dict(), "args": args}, tmp_path / "official.pth")
    torch.save({"model": ours.state_dict()}, tmp_path / "release.pth")
    for name in ("official", "release"):
        convert(str(tmp_path / f"{name}.pth"), str(tmp_path / f"{name}.safetensors"), "safetensors")
        read = load_checkpoint_file(tmp_path / f"{name}.safetensors")
        assert read["model_name"] == "mae_vit_tiny_patch4"
        assert read["args"]["input_size"] == 32 and read["args"]["in_chans"] == 3
    assert load_checkpoint_file(tmp_path / "official.safetensors")["args"]["norm_pix_loss"] is True


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("num_hidden_layers", 12, "config.json says num_hidden_layers 12, its weights have 6"),
        ("image_size", 224, r"config.json says image_size \(tokens\) 3137, its weights have 65"),
        ("decoder_hidden_size", 256, "config.json says decoder_hidden_size 256, its weights have 128"),
        (
            "num_attention_heads",
            6,
            "states 6 attention heads; mae_vit_tiny_patch4, whose shapes its weights have, has 3",
        ),
        ("image_size", "abc", "config.json has a missing or malformed setting"),
    ],
)
def test_a_config_that_does_not_fit_its_weights(tmp_path: Path, setting: str, value, message: str) -> None:
    hf_mae(False).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, setting: value}))
    with pytest.raises(UsageError, match=message):
        convert(str(tmp_path / "hf"), str(tmp_path / "x.pth"), "official")
    assert not (tmp_path / "x.pth").exists()


def test_the_scripts_refuse_weights_with_other_heads(tmp_path: Path) -> None:
    config = transformers.ViTConfig(**{**TINY_HF, "num_attention_heads": 6}, num_labels=2)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    model = build_classifier("vit_tiny_patch4", 32, 2, 0.0, global_pool=False)
    with pytest.raises(UsageError, match="states 6 attention heads, the model has 3: choose the --model with 6"):
        load_pretrained(model, str(tmp_path / "hf"))


def test_folders_that_are_no_model(tmp_path: Path) -> None:
    hf_mae(False).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="config.json holds a JSON list, not an object of settings"):
        load_checkpoint_file(tmp_path / "hf")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(UsageError, match=r"pytorch_model.bin cannot be read as weights"):
        load_checkpoint_file(tmp_path / "bin")
    with pytest.raises(UsageError, match="that would hold .* does not exist"):
        convert(str(tmp_path / "hf"), str(tmp_path / "no" / "such.pth"), "official")


def test_a_sharded_folder_reads_as_the_single_file(tmp_path: Path) -> None:
    hf = hf_mae(True)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_tensors(
        state_dict_of(load_checkpoint_file(tmp_path / "sharded")), state_dict_of(load_checkpoint_file(tmp_path / "one"))
    )


def test_a_failed_write_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    src = checkpoints(tmp_path)["mae"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        convert(str(src), str(tmp_path / "hf"), "hf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("hf")) == []


def test_timm_overlay_files_are_read_by_content(tmp_path: Path) -> None:
    """timm itself picks a reader by the file name; this project's models read the overlay's file by content."""
    hf_mae(False, eps=1e-12).save_pretrained(tmp_path / "hf")
    src = checkpoints(tmp_path)["mixmim_ft"]
    convert(str(src), str(tmp_path / "mixmim.weights"), "safetensors")  # no .safetensors suffix
    expected = state_dict_of(load_checkpoint_file(tmp_path / "hf"))
    vit = timm.create_model("vit_tiny_patch4", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "hf")))
    assert torch.equal(vit.state_dict()["blocks.1.attn.qkv.bias"], expected["blocks.1.attn.qkv.bias"])
    assert vit.blocks[0].norm1.eps == 1e-12
    mixmim = timm.create_model(
        "mixmim_tiny_ft", img_size=64, num_classes=5, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "mixmim.weights")),
    )  # fmt: skip
    assert_same_tensors(mixmim.state_dict(), torch.load(src, weights_only=True)["model"])


def test_a_torn_safetensors_file_is_one_line_for_the_scripts(tmp_path: Path) -> None:
    """The scripts read a checkpoint's eps and statistics from its header before its weights: a torn file is one
    line there too."""
    src = checkpoints(tmp_path)["vit"]
    convert(str(src), str(tmp_path / "ok.safetensors"), "safetensors")
    whole = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(whole[: len(whole) // 2])
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    args = parse(
        main_finetune.get_args_parser(),
        **tiny_run_args(data, tmp_path / "out", model="vit_tiny_patch4", finetune=tmp_path / "torn.safetensors"),
    )
    with pytest.raises(UsageError, match="torn.safetensors is a truncated or corrupt safetensors file"):
        main_finetune.main(args)


# ----------------------------------------------------------------------------- audit: what was lost or misnamed


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_named_model_that_is_unknown_or_of_the_other_family(tmp_path: Path) -> None:
    """``--model`` names what is wrong with it: unknown (with the names there are), or of the other family."""
    torch.manual_seed(0)
    mae = save_ours(build_pretrain_model("mae_vit_tiny_patch4", 32), tmp_path / "mae.pth", "mae_vit_tiny_patch4")
    mixmim = save_ours(build_pretrain_model("mixmim_tiny", 64), tmp_path / "mixmim.pth", "mixmim_tiny", 64)
    cases = [
        (
            mae,
            "foo",
            r"unknown --model 'foo'; pretraining models: mae_vit_base_patch16 .*classifiers: vit_base_patch16",
        ),
        (mae, "mixmim_base", r"--model mixmim_base is a MixMIM model; .*mae.pth holds ViT weights"),
        (mixmim, "vit_tiny_patch4", r"--model vit_tiny_patch4 is a ViT model; .*mixmim.pth holds MixMIM weights"),
    ]
    for src, name, message in cases:
        with pytest.raises(UsageError, match=message) as e:
            convert(str(src), str(tmp_path / "x.pth"), "official", model_name=name)
        one_line(e)
    named = save_ours(build_pretrain_model("mae_vit_tiny_patch4", 32), tmp_path / "named.pth", "foo")
    with pytest.raises(UsageError, match=r"named.pth names its model 'foo', which this project does not build: name "
                       "its model with --model") as e:  # fmt: skip
        convert(str(named), str(tmp_path / "x.pth"), "official")
    one_line(e)
    with pytest.raises(UsageError, match=r"unknown --model 'foo'"):
        convert(str(named), str(tmp_path / "x.pth"), "official", model_name="foo")  # the flag then speaks
    assert not (tmp_path / "x.pth").exists()
    convert(str(named), str(tmp_path / "x.pth"), "official", model_name="mae_vit_tiny_patch4")
    assert torch.load(tmp_path / "x.pth", weights_only=True)["model_name"] == "mae_vit_tiny_patch4"


def linear_probe(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A main_linprobe.py checkpoint: the classifier with ``head.0`` (BatchNorm without affine: running statistics
    only) and ``head.1`` (the linear layer)."""
    from model_table import add_probe_head

    torch.manual_seed(0)
    model = build_classifier("vit_tiny_patch4", 32, 5, 0.0, global_pool=False)
    add_probe_head(model)
    perturb(model)
    with torch.no_grad():
        model.head[0].running_mean.normal_()
        model.head[0].running_var.uniform_(0.5, 2.0)
        model.head[0].num_batches_tracked.fill_(9)
    return save_ours(model, tmp_path / "probe.pth", "vit_tiny_patch4"), model


def test_a_linear_probe_head_is_kept_whole_or_refused(tmp_path: Path) -> None:
    """Hugging Face and timm have no place for the probe's BatchNorm: one line instead of a folder without the head;
    official and safetensors keep it, and the probe model main_linprobe.py builds reads it back strictly."""
    src, model = linear_probe(tmp_path)
    for to in ("hf", "timm"):
        message = r"probe.pth holds a linear-probe head \(head.0 BatchNorm, head.1 Linear: main_linprobe.py's\), "
        message += rf"which {'Hugging Face' if to == 'hf' else 'timm'} has no classifier for: --to safetensors or "
        with pytest.raises(UsageError, match=message + "--to official keep it whole; --encoder_only") as e:
            convert(str(src), str(tmp_path / to), to)
        one_line(e)
        assert not (tmp_path / to).exists()
    from model_table import add_probe_head

    x = torch.randn(2, 3, 32, 32)
    for to, name in (("official", "p.pth"), ("safetensors", "p.safetensors")):
        convert(str(src), str(tmp_path / name), to)
        state = state_dict_of(load_checkpoint_file(tmp_path / name))
        assert_same_tensors(state, model.state_dict())
        again = build_classifier("vit_tiny_patch4", 32, 5, 0.0, global_pool=False)
        add_probe_head(again)
        load_model_strict(again, state, name)
        with torch.no_grad():
            assert torch.equal(again.eval()(x), model.eval()(x))
    assert convert(str(src), str(tmp_path / "enc"), "timm", encoder_only=True).startswith("timm ")
    assert convert(str(src), str(tmp_path / "hf_enc"), "hf", encoder_only=True) == "Hugging Face ViTModel"


def test_the_timm_architecture_is_the_one_of_these_sizes_or_none(tmp_path: Path) -> None:
    """B / L / H are timm's vit_{base,large}_patch16_224 / vit_huge_patch14_224 (timm's own models, on the meta
    device, say so); the tiny MAE has no timm architecture and is not called one."""
    from convert import timm_architecture

    for name in ("vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"):
        with torch.device("meta"):
            ours = build_classifier(name, 224, 0, 0.0)
        patch, width, depth = ours.patch_embed.patch_size[0], ours.embed_dim, len(ours.blocks)
        factory, exact = timm_architecture(patch, width, depth, ours.blocks[0].attn.num_heads)
        with torch.device("meta"):
            theirs = timm.create_model(factory)
        assert exact and (theirs.patch_embed.patch_size[0], theirs.embed_dim, len(theirs.blocks)) == (
            patch, width, depth)  # fmt: skip
    src = save_ours(our_mae(False), tmp_path / "tiny.pth", "mae_vit_tiny_patch4")
    what = convert(str(src), str(tmp_path / "enc"), "timm")
    assert "vit_base" not in what and "no timm architecture has patch 4, width 192, depth 6" in what
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"  # the factory of the same width, as timm's save_for_hf
    assert timm.create_model(f"local-dir:{tmp_path / 'enc'}", pretrained=True).patch_embed.patch_size == (4, 4)
