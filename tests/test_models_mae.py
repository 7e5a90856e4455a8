"""MAE pretraining model: golden values from the official code, masking invariants, checkpoint compatibility."""

import json
from pathlib import Path

import pytest
import timm
import torch

import models_mae

ASSETS = Path(__file__).parent / "assets"
GOLDEN = json.loads((ASSETS / "mae_golden.json").read_text())
OFFICIAL_KEYS = json.loads((ASSETS / "mae_official_state_dict_keys.json").read_text())


def tiny(**kw) -> models_mae.MaskedAutoencoderViT:
    return models_mae.mae_vit_tiny_patch4(**kw)


def state_stats(model: torch.nn.Module) -> dict:
    return {
        n: [float(p.detach().double().sum()), float(p.detach().double().norm())] for n, p in model.state_dict().items()
    }


@pytest.mark.parametrize("npl", [False, True])
def test_matches_official_golden_values(npl):
    """Same seeds as the official code (run once under timm 0.3.2) -> same init, mask, loss, outputs, gradients."""
    gold = GOLDEN[f"mae_tiny_npl{int(npl)}"]
    torch.manual_seed(0)
    model = tiny(norm_pix_loss=npl)
    init = state_stats(model)
    assert init.keys() == gold["init"].keys()
    for name, (s, n) in gold["init"].items():
        assert init[name] == pytest.approx([s, n], rel=1e-5, abs=1e-5), name

    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(2)
    loss, pred, mask = model(x, mask_ratio=0.75)
    loss.backward()
    assert torch.equal(mask, torch.tensor(gold["mask"]))
    assert loss.item() == pytest.approx(gold["loss"], rel=1e-5)
    torch.testing.assert_close(pred[:, :3, :6], torch.tensor(gold["pred_slice"]), rtol=1e-4, atol=1e-5)
    assert pred.double().sum().item() == pytest.approx(gold["pred_sum"], rel=1e-4, abs=1e-3)
    grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == gold["grad_norms"].keys()
    for name, g in gold["grad_norms"].items():
        assert grads[name] == pytest.approx(g, rel=1e-4, abs=1e-7), name


def test_visible_patch_count_and_restore():
    model = tiny()
    x = torch.randn(5, 64, 8)
    for ratio in (0.5, 0.75, 0.9):
        kept, mask, ids_restore = model.random_masking(x, ratio)
        n_keep = int(64 * (1 - ratio))
        assert kept.shape == (5, n_keep, 8)
        assert torch.all(mask.sum(1) == 64 - n_keep)
        # the kept tokens are exactly the unmasked ones, in shuffled order
        ids_shuffle = torch.argsort(ids_restore, dim=1)
        assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(64).expand(5, -1))
        for i in range(5):
            visible = x[i][mask[i] == 0]
            assert torch.equal(torch.sort(visible, 0).values, torch.sort(kept[i], 0).values)


def test_noise_argument_gives_deterministic_mask():
    model = tiny()
    noise = torch.rand(3, 64)
    x = torch.randn(3, 64, 4)
    _, m1, _ = model.random_masking(x, 0.75, noise=noise)
    _, m2, _ = model.random_masking(x, 0.75, noise=noise)
    assert torch.equal(m1, m2)
    # the 16 smallest noise entries are kept
    assert torch.equal(m1 == 0, noise <= noise.sort(1).values[:, 15:16])
    with pytest.raises(ValueError, match="noise must have shape"):
        model.random_masking(x, 0.75, noise=torch.rand(3, 10))


def test_patchify_round_trip_and_layout():
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(model.unpatchify(patches), imgs)
    # patch 1 is the second 4x4 patch of the first row, flattened as (p, p, C)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    with pytest.raises(ValueError, match="divisible"):
        model.patchify(torch.randn(1, 3, 30, 30))


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 64, 48)
    mask = (torch.rand(2, 64) > 0.5).float()
    loss = model.forward_loss(imgs, pred, mask)
    pred2 = pred.clone()
    pred2[mask == 0] += 100.0
    assert model.forward_loss(imgs, pred2, mask) == loss
    pred3 = pred.clone()
    pred3[mask == 1] += 1.0
    assert model.forward_loss(imgs, pred3, mask) != loss


def test_norm_pix_loss_target_is_normalised_per_patch():
    model = tiny(norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32) * 5 + 3
    mask = torch.ones(2, 64)
    # with pred = 0 the loss is the mean square of the target: 1 for per-patch zero-mean, unit-variance targets
    loss = model.forward_loss(imgs, torch.zeros(2, 64, 48), mask)
    n = 48
    assert loss.item() == pytest.approx((n - 1) / n, rel=1e-3)  # var is unbiased, the mean square is biased
    target = model.patchify(imgs)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert model.forward_loss(imgs, normed, mask).item() == pytest.approx(0.0, abs=1e-10)


def test_norm_pix_loss_epsilon_keeps_flat_patches_finite():
    """The target is (x - mean) / sqrt(var + 1e-6) per patch (unbiased var, as official). A constant patch (black
    padding) gives target 0, not 0/0; a patch of variance v gives, against pred = 0, the loss (n-1)/n * v/(v+1e-6)."""
    model = tiny(norm_pix_loss=True)
    imgs = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    pred, mask = torch.zeros(1, 64, 48, dtype=torch.float64), torch.ones(1, 64, dtype=torch.float64)
    assert model.forward_loss(imgs, pred, mask).item() == 0.0  # black image
    imgs[0, 0, :4, :4] = 1e-3 * torch.tensor([[1.0, -1.0] * 2, [-1.0, 1.0] * 2] * 2, dtype=torch.float64)  # patch 0
    n = 48
    v = 16 * 1e-6 / (n - 1)  # 16 entries of +-1e-3 around mean 0 in the patch, unbiased variance
    expected = (n - 1) / n * v / (v + 1e-6) / 64  # patch 0's loss, averaged over the 64 masked patches
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"])
@pytest.mark.parametrize("suffix", ["", "_dec512d8b"])  # the official factories and their aliases
def test_official_checkpoint_keys_load_strictly(name, suffix):
    with torch.device("meta"):
        model = timm.create_model(name + suffix)
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == list(OFFICIAL_KEYS[name].items())  # same names, shapes and order
    # strict load of an official-shaped state_dict (the mae_visualize_vit_*.pth layout)
    sd = {k: torch.empty(s, device="meta") for k, s in OFFICIAL_KEYS[name].items()}
    model.load_state_dict(sd, strict=True, assign=True)


def test_factories_accept_overrides():
    m = timm.create_model("mae_vit_tiny_patch4", img_size=64, norm_pix_loss=True)
    assert m.patch_embed.num_patches == 256 and m.norm_pix_loss


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"built for \(32, 32\)"):
        tiny()(torch.randn(1, 3, 64, 64))


def test_fused_and_plain_attention_agree():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    for blk in list(model.blocks) + list(model.decoder_blocks):
        blk.attn.fused_attn = True
    loss_f, pred_f, _ = model(x, noise=noise)
    for blk in list(model.blocks) + list(model.decoder_blocks):
        blk.attn.fused_attn = False
    loss_p, pred_p, _ = model(x, noise=noise)
    torch.testing.assert_close(pred_f, pred_p, rtol=1e-5, atol=1e-5)
    assert loss_f.item() == pytest.approx(loss_p.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_close_to_fp32(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("fp16 autocast is a GPU mode")
    torch.manual_seed(0)
    model = tiny().to(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    noise = torch.rand(4, 64, device=device)
    loss32, _, _ = model(x, noise=noise)
    with torch.autocast(device_type=device, dtype=dtype):
        loss_lp, pred_lp, _ = model(x, noise=noise)
    assert pred_lp.dtype == dtype
    assert torch.isfinite(loss_lp)
    assert loss_lp.item() == pytest.approx(loss32.item(), rel=0.05)
    loss_lp.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_patchify_of_non_square_and_n_channel_images_follows_the_patch_layout():
    """Patch (i, j) of an (N, C, H, W) image is the pixels [i*p:(i+1)*p, j*p:(j+1)*p] flattened as (p, p, C), row-major
    over the (H/p, W/p) grid; unpatchify inverts it with the model's grid."""
    model = models_mae.mae_vit_tiny_patch4(img_size=(16, 24), in_chans=5)
    imgs = torch.randn(2, 5, 16, 24)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 4 * 6, 4 * 4 * 5)
    for i in range(4):
        for j in range(6):
            expected = imgs[:, :, i * 4 : (i + 1) * 4, j * 4 : (j + 1) * 4].permute(0, 2, 3, 1).reshape(2, -1)
            assert torch.equal(patches[:, i * 6 + j], expected)
    assert torch.equal(model.unpatchify(patches), imgs)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert pred.shape == patches.shape and mask.shape == (2, 24) and torch.isfinite(loss)
