"""The classifiers as timm backbones: timm's own model test suite, feature maps against a plain forward, the
feature configuration of every size, and checkpoints loaded by timm's ``pretrained_cfg_overlay=dict(file=...)``."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
import torch

import models_mae
import models_mixmim
import models_vit
from util.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]

# the tests of timm's tests/test_models.py each classifier must pass (as timm's own ViT / Swin do): ViTs count
# as timm's "non-standard" models (their features are tokens), so they take the _non_std config test and no
# features_only-by-hooks test, as timm's ViT
_BOTH = [
    "test_model_forward[1-{}]",
    "test_model_backward[2-{}]",
    "test_model_forward_intermediates[1-{}]",
    "test_model_forward_intermediates_features[1-{}]",
    "test_prune_intermediate_layers_contract[{}]",
    "test_model_forward_torchscript[1-{}]",
    "test_model_forward_fx[1-{}]",
    "test_model_backward_fx[2-{}]",
    "test_model_forward_fx_torchscript[1-{}]",
]
SUITE_TESTS = {
    "vit_tiny_patch4": _BOTH + ["test_model_default_cfgs_non_std[1-{}]"],
    "mixmim_tiny_ft": _BOTH + ["test_model_default_cfgs[1-{}]", "test_model_forward_features[1-{}]"],
}


@pytest.fixture(scope="module")
def timm_model_tests(pytestconfig) -> Path:
    """``tests/test_models.py`` of the installed timm's source release (downloaded once into pytest's cache)."""
    version = timm.__version__
    root = pytestconfig.cache.mkdir(f"timm-{version}-sdist")
    tests = root / f"timm-{version}" / "tests" / "test_models.py"
    if not tests.exists():
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + ["--disable-pip-version-check", f"timm=={version}", "-d", str(root)],
            capture_output=True,
            text=True,
        )
        sdist = root / f"timm-{version}.tar.gz"
        if r.returncode or not sdist.exists():
            message = f"could not download timm {version}'s source release: {r.stderr.strip()[-300:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"timm-{version}/tests/")]
            tar.extractall(root, members=members, filter="data")
    return tests


def test_timm_model_suite_passes_on_the_classifiers(timm_model_tests: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "timm_model_suite", "-p", "no:cacheprovider", "-q", "-rA"]
        + ["-W", "ignore", timm_model_tests.name],
        cwd=timm_model_tests.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    passed = {line.split("::", 1)[1].split(" ")[0] for line in r.stdout.splitlines() if line.startswith("PASSED ")}
    failed = [line for line in r.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    assert not failed and r.returncode == 0, "\n".join(failed) or r.stdout[-3000:]
    expected = {t.format(name) for name, tests in SUITE_TESTS.items() for t in tests}
    assert expected <= passed, f"not run: {sorted(expected - passed)}"


# ----------------------------------------------------------------------------- feature maps


def _hooked(forward, modules: dict[int, torch.nn.Module], x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The outputs of ``modules`` during a plain ``forward(x)``."""
    seen = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out)) for i, m in modules.items()]
    with torch.no_grad():
        forward(x)
    for h in handles:
        h.remove()
    return seen


def test_vit_intermediates_are_the_blocks_tokens() -> None:
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch4(num_classes=5, global_pool=False).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = _hooked(model, dict(enumerate(model.blocks)), x)  # (2, 1 + 64, 192) after each block
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[1, 3, 5], intermediates_only=True)
        nlc = model.forward_intermediates(x, indices=[1, 3, 5], output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
    for got, i in zip(maps, [1, 3, 5], strict=True):  # the patch tokens on the 8x8 grid, row-major
        expected = tokens[i][:, 1:].reshape(2, 8, 8, 192).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for got, i in zip(nlc, [1, 3, 5], strict=True):
        torch.testing.assert_close(got, tokens[i][:, 1:], rtol=0, atol=0)
    for got, i in zip(normed, [4, 5], strict=True):  # an int: the last n blocks
        expected = model.norm(tokens[i])[:, 1:].reshape(2, 8, 8, 192).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_mixmim_intermediates_are_the_stages_maps() -> None:
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny_ft(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    stage_out = _hooked(model, {i: layer.blocks[-1] for i, layer in enumerate(model.layers)}, x)  # before merging
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, norm=True)
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
    sides, widths = [32, 16, 8, 4], [32, 64, 128, 256]
    for i, (got, s, d) in enumerate(zip(maps, sides, widths, strict=True)):
        expected = stage_out[i] if i < 3 else model.norm(stage_out[i])  # norm: the last stage only
        torch.testing.assert_close(got, expected.reshape(2, s, s, d).permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(nhwc[0], stage_out[0].reshape(2, 32, 32, 32), rtol=0, atol=0)
    torch.testing.assert_close(final, maps[3], rtol=0, atol=0)
    # the classifier pools the final map: the official average of the last stage's normalised tokens
    with torch.no_grad():
        expected_logits = model.head(model.norm(stage_out[3]).mean(dim=1))
        torch.testing.assert_close(model(x), expected_logits, rtol=1e-5, atol=1e-6)


# every classifier size: (channels, strides) of timm.create_model(features_only=True); ViT: the last 3 blocks at
# the patch size, MixMIM: its four stages (embed_dim * 2**i at patch_size * 2**i)
FEATURES = {
    "vit_base_patch16": ([768] * 3, [16] * 3),
    "vit_large_patch16": ([1024] * 3, [16] * 3),
    "vit_huge_patch14": ([1280] * 3, [14] * 3),
    "vit_tiny_patch4": ([192] * 3, [4] * 3),
    "mixmim_base_ft": ([128, 256, 512, 1024], [4, 8, 16, 32]),
    "mixmim_base_384_ft": ([128, 256, 512, 1024], [4, 8, 16, 32]),
    "mixmim_large_ft": ([192, 384, 768, 1536], [4, 8, 16, 32]),
    "mixmim_large_384_ft": ([192, 384, 768, 1536], [4, 8, 16, 32]),
    "mixmim_huge_ft": ([352, 704, 1408, 2816], [4, 8, 16, 32]),
    "mixmim_tiny_ft": ([32, 64, 128, 256], [2, 4, 8, 16]),
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_features_only_channels_strides_and_shapes(name: str) -> None:
    channels, strides = FEATURES[name]
    with torch.device("meta"):
        backbone = timm.create_model(name, features_only=True)
        size = backbone.pretrained_cfg["input_size"][-1]
        maps = backbone(torch.empty(2, 3, size, size))
    assert backbone.feature_info.channels() == channels
    assert backbone.feature_info.reduction() == strides
    assert [tuple(m.shape) for m in maps] == [
        (2, c, size // s, size // s) for c, s in zip(channels, strides, strict=True)
    ]
    assert timm.get_pretrained_cfg_value(name, "first_conv") == "patch_embed.proj"


def test_vit_out_indices_pick_blocks() -> None:
    with torch.device("meta"):
        backbone = timm.create_model("vit_base_patch16", features_only=True, out_indices=(3, 5, 7, 11))
    assert [info["module"] for info in backbone.feature_info.get_dicts()] == [f"blocks.{i}" for i in (3, 5, 7, 11)]


def test_mixmim_fixed_position_table_is_a_buffer_under_the_official_name() -> None:
    model = models_mixmim.mixmim_tiny_ft()
    assert "absolute_pos_embed" in model.state_dict()
    assert "absolute_pos_embed" in dict(model.named_buffers())
    assert "absolute_pos_embed" not in dict(model.named_parameters())


def test_device_and_dtype_reach_every_tensor() -> None:
    for name in ("vit_tiny_patch4", "mixmim_tiny_ft"):
        model = timm.create_model(name, device="meta", dtype=torch.bfloat16)
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        assert all(t.device.type == "meta" for t in tensors.values()), name
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}, name


# ----------------------------------------------------------------------------- checkpoints through timm


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # away from the initial values, so that a weight left unloaded shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("layout", ["official", "bare"])
def test_mae_pretraining_checkpoint_loads_into_the_timm_backbone(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    mae = _perturbed(models_mae.mae_vit_tiny_patch4())
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict()} if layout == "official" else mae.state_dict(), path)
    overlay = dict(file=str(path))
    model = timm.create_model(
        "vit_tiny_patch4", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, global_pool=False
    )
    backbone = timm.create_model("vit_tiny_patch4", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
    x = torch.randn(2, 3, 32, 32)

    # nothing masked and the noise keeping the patches in order: the MAE encoder's tokens
    def encode(images):
        return mae.forward_encoder(images, mask_ratio=0.0, noise=torch.arange(64.0).expand(2, -1))[0]

    blocks = _hooked(encode, {i: mae.blocks[i] for i in (3, 4, 5)}, x)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encode(x), rtol=0, atol=0)
        maps = backbone(x)
        backbone.train()  # no masking, no dropout: the same maps in training mode
        again = backbone(x)
    for m, a, i in zip(maps, again, (3, 4, 5), strict=True):  # the last 3 blocks' patch tokens on the 8x8 grid
        torch.testing.assert_close(m, blocks[i][:, 1:].reshape(2, 8, 8, 192).permute(0, 3, 1, 2), rtol=0, atol=0)
        torch.testing.assert_close(a, m, rtol=0, atol=0)


def test_mixmim_pretraining_checkpoint_loads_into_the_timm_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mixmim = _perturbed(models_mixmim.mixmim_tiny())
    path = tmp_path / "mixmim.pth"
    torch.save({"model": mixmim.state_dict()}, path)
    overlay = dict(file=str(path))
    model = timm.create_model("mixmim_tiny_ft", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0).eval()
    backbone = timm.create_model("mixmim_tiny_ft", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = mixmim.forward_encoder(x, None)  # (2, 16, 256), nothing mixed
        torch.testing.assert_close(model.forward_features(x), tokens.reshape(2, 4, 4, 256).permute(0, 3, 1, 2))
        torch.testing.assert_close(model(x), tokens.mean(dim=1), rtol=1e-5, atol=1e-6)
        maps = backbone.eval()(x)
        backbone.train()
        again = backbone(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    for a, b in zip(maps, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name, size", [("vit_tiny_patch4", 32), ("mixmim_tiny_ft", 64)])
def test_a_fine_tuned_checkpoint_loads_into_a_headless_backbone(tmp_path: Path, name: str, size: int) -> None:
    torch.manual_seed(0)
    classifier = _perturbed(timm.create_model(name, num_classes=7))
    path = tmp_path / "finetuned.pth"
    torch.save({"model": classifier.state_dict()}, path)
    backbone = timm.create_model(name, num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        pooled = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        torch.testing.assert_close(backbone.eval()(x), pooled, rtol=0, atol=0)


def test_mixmim_stop_early_and_unpooled_head() -> None:
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny_ft(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        final, maps = model.forward_intermediates(x, indices=[1], stop_early=True)
        pruned = models_mixmim.mixmim_tiny_ft(num_classes=5).eval()
        pruned.load_state_dict(model.state_dict())
        pruned.prune_intermediate_layers([1])
        torch.testing.assert_close(pruned.forward_features(x), final, rtol=0, atol=0)
        # the final map is where the stages stopped: stage 1's map, before the merging (as a pruned model's)
        assert torch.equal(maps[0], full[1]) and torch.equal(final, full[1])
        model.reset_classifier(3, "")  # no pooling: the head classifies every position of the last map
        logits = model(x)
    weight, bias = model.head.weight, model.head.bias
    expected = torch.einsum("bdhw,cd->bchw", model.forward_features(x), weight) + bias[:, None, None]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_the_other_family_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mixmim.pth"
    torch.save({"model": models_mixmim.mixmim_tiny().state_dict()}, path)
    with pytest.raises(UsageError, match="is a MixMIM checkpoint but the model is ViT"):
        timm.create_model("vit_tiny_patch4", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_without_a_file_says_so() -> None:
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):
        timm.create_model("vit_tiny_patch4", pretrained=True)
