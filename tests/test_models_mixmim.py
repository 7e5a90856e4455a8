"""MixMIM models: golden values from the official code, mixing/masking invariants, attention paths, checkpoints."""

import json
import random
from pathlib import Path

import pytest
import timm
import torch

import models_mixmim
from model_table import resolve_classifier_name
from util.lr_decay import param_groups_lrd
from util.pos_embed import interpolate_pos_embed_mixmim

ASSETS = Path(__file__).parent / "assets"
GOLDEN = json.loads((ASSETS / "mixmim_golden.json").read_text())
OFFICIAL_KEYS = json.loads((ASSETS / "mixmim_official_state_dict_keys.json").read_text())
OFFICIAL_LRD = json.loads((ASSETS / "mixmim_official_lrd_base.json").read_text())
OFFICIAL_INTERP = json.loads((ASSETS / "mixmim_official_interp_384.json").read_text())


def state_stats(model: torch.nn.Module) -> dict:
    return {
        n: [float(p.detach().double().sum()), float(p.detach().double().norm())] for n, p in model.state_dict().items()
    }


def seeded_images(batch: int = 4, size: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size)


def grad_norms(model: torch.nn.Module) -> dict:
    return {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------- official numbers


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "sdpa"])
@pytest.mark.parametrize("case", ["tiny", "tiny_range"])
def test_pretraining_matches_official_golden_values(case, fused):
    """Official code (timm 0.5.4, same config) run once: same seeds -> same init, mask, loss, outputs, gradients."""
    gold = GOLDEN[case]
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny(range_mask_ratio=0.3 if case == "tiny_range" else 0.0, fused_attn=fused)
    init = state_stats(model)
    assert init.keys() == gold["init"].keys()
    for name, (s, n) in gold["init"].items():
        assert init[name] == pytest.approx([s, n], rel=1e-5, abs=1e-5), name

    x = seeded_images()
    torch.manual_seed(2)
    random.seed(2)  # the mask ratio jitter is drawn from Python's random, as in the official code
    loss, x_rec, mask = model(x, mask_ratio=0.5)
    loss.backward()
    assert torch.equal(mask.flatten(), torch.tensor(gold["mask"]))
    assert loss.item() == pytest.approx(gold["loss"], rel=1e-5)
    torch.testing.assert_close(x_rec[:, :3, :6], torch.tensor(gold["x_rec_slice"]), rtol=1e-4, atol=1e-5)
    assert x_rec.double().sum().item() == pytest.approx(gold["x_rec_sum"], rel=1e-4, abs=1e-3)
    grads = grad_norms(model)
    assert grads.keys() == gold["grad_norms"].keys()
    for name, g in gold["grad_norms"].items():
        assert grads[name] == pytest.approx(g, rel=1e-4, abs=1e-7), name


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "sdpa"])
def test_classifier_matches_official_golden_values(fused):
    gold = GOLDEN["tiny_ft"]
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny_ft(num_classes=10, fused_attn=fused)
    init = state_stats(model)
    assert init.keys() == gold["init"].keys()
    for name, (s, n) in gold["init"].items():
        assert init[name] == pytest.approx([s, n], rel=1e-5, abs=1e-5), name
    y = model(seeded_images())
    y.pow(2).sum().backward()
    torch.testing.assert_close(y, torch.tensor(gold["logits"]), rtol=1e-4, atol=1e-5)
    grads = grad_norms(model)
    assert grads.keys() == gold["grad_norms"].keys()
    for name, g in gold["grad_norms"].items():
        assert grads[name] == pytest.approx(g, rel=1e-4, abs=1e-7), name


# ----------------------------------------------------------------------------------------------------- masking


def test_same_masked_region_at_every_stage():
    model = models_mixmim.mixmim_tiny()
    x = torch.zeros(2, 3, 64, 64)
    for ratio in (0.25, 0.5, 0.75):
        masks = model.random_masking(x, ratio)
        out = masks[-1].reshape(4, 4)  # output grid: 64 / 16
        assert out.sum().item() == int(16 * ratio)
        for i, m in enumerate(masks):
            f = 2 ** (3 - i)
            grid = m.reshape(4 * f, 4 * f)
            # every token carries the mask of the output cell it lies in, i.e. the same image region
            assert torch.equal(grid, out.repeat_interleave(f, 0).repeat_interleave(f, 1)), i
            assert m.shape == (1, (4 * f) ** 2, 1)


def test_range_mask_ratio_draws_from_python_random():
    model = models_mixmim.mixmim_tiny(range_mask_ratio=0.4)
    x = torch.zeros(2, 3, 64, 64)
    counts = set()
    for seed in range(20):
        random.seed(seed)
        expected = int(16 * (0.5 + random.uniform(0.0, 0.4)))
        random.seed(seed)
        n = model.random_masking(x, 0.5)[-1].sum().item()
        assert n == expected
        counts.add(n)
    assert len(counts) > 1


def test_noise_argument_gives_deterministic_mask():
    model = models_mixmim.mixmim_tiny()
    x = torch.zeros(2, 3, 64, 64)
    noise = torch.rand(16)
    m1 = model.random_masking(x, 0.5, noise=noise)[-1].flatten()
    m2 = model.random_masking(x, 0.5, noise=noise.reshape(1, 1, 16))[-1].flatten()
    assert torch.equal(m1, m2)
    assert torch.equal(m1 == 1, noise < noise.sort().values[8])  # the 8 smallest are masked (as official)
    with pytest.raises(ValueError, match="noise must have 16 elements"):
        model.random_masking(x, 0.5, noise=torch.rand(10))


# ------------------------------------------------------------------------------------------ mixing invariants


def _encode(model, x, masks):
    with torch.no_grad():
        return model.forward_encoder(x, masks)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "sdpa"])
def test_mixed_images_do_not_see_each_other(fused, monkeypatch):
    """Images 1 and 2 are mixed together (2 = flip of 1 in a batch of 4): changing image 1 leaves image 2's
    encoder tokens unchanged in both rows it occupies."""
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny(fused_attn=fused).eval()
    x = seeded_images(4)
    checker = (torch.arange(4)[:, None] + torch.arange(4)).remainder(2).float()  # (4, 4) output grid
    masks = model.random_masking(x, 0.5, noise=checker)  # every window (2x2 output cells) holds both images
    m = masks[-1][0, :, 0].bool()  # (Lo,) True where row i holds the partner's (image 3-i's) tokens
    x2 = x.clone()
    x2[1] = torch.randn(3, 64, 64)

    z, z2 = _encode(model, x, masks), _encode(model, x2, masks)  # (4, Lo, D)
    torch.testing.assert_close(z2[1][m], z[1][m], rtol=0, atol=1e-6)  # image 2's tokens in row 1
    torch.testing.assert_close(z2[2][~m], z[2][~m], rtol=0, atol=1e-6)  # image 2's own tokens in row 2
    torch.testing.assert_close(z2[[0, 3]], z[[0, 3]], rtol=0, atol=0)
    assert (z2[1][~m] - z[1][~m]).abs().amax(-1).min() > 1e-3  # image 1's tokens do change
    assert (z2[2][m] - z[2][m]).abs().amax(-1).min() > 1e-3

    # control: without the attention mask the change leaks into image 2's tokens, so the test can fail
    monkeypatch.setattr(models_mixmim, "window_mix_mask", lambda mask, h, w, ws: None)
    z, z2 = _encode(model, x, masks), _encode(model, x2, masks)
    assert (z2[1][m] - z[1][m]).abs().max() > 1e-4


def test_unmix_puts_each_prediction_back_in_place():
    torch.manual_seed(0)
    B, Lo, P = 3, 16, 5
    target = torch.randn(B, Lo, P)
    mask = (torch.rand(1, Lo, 1) > 0.5).float()
    garbage = torch.full((B, Lo, P), 1e6)
    # rows [0, B) predict image i where mask is 1; row B+j predicts image B-1-j where mask is 0
    x1 = torch.where(mask.bool(), target, garbage)
    x2 = torch.where(mask.bool(), garbage, target.flip(0))
    assert torch.equal(models_mixmim.MixMIM.unmix(torch.cat([x1, x2]), mask), target)


def test_unmixed_prediction_of_an_image_depends_on_that_image_only():
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny(norm_pix_loss=False).eval()
    x = seeded_images(4)
    noise = torch.rand(16)
    x2 = x.clone()
    x2[1] = torch.randn(3, 64, 64)
    with torch.no_grad():
        _, rec, mask = model(x, noise=noise)
        _, rec2, mask2 = model(x2, noise=noise)
    assert torch.equal(mask, mask2)
    assert 0 < mask.sum() < 16
    u, u2 = model.unmix(rec, mask), model.unmix(rec2, mask)  # (4, Lo, S*S*3)
    # image 2 shared its rows with image 1, yet its prediction is untouched; image 1's changes
    torch.testing.assert_close(u2[[0, 2, 3]], u[[0, 2, 3]], rtol=0, atol=1e-5)
    assert (u2[1] - u[1]).abs().max() > 1e-3
    # the loss is the mean squared error of the unmixed prediction against each image's own patches
    loss = model.forward_loss(x, rec, mask)
    assert loss.item() == pytest.approx(((u - model.patchify(x)) ** 2).mean().item(), rel=1e-6)


def test_norm_pix_loss_epsilon_keeps_flat_patches_finite():
    """As MAE: target (x - mean) / sqrt(var + 1e-6) per patch. Black images give loss 0, not NaN; one patch of
    variance v among the 4 of two 32x32 images gives, against a zero prediction, (n-1)/n * v/(v+1e-6) / 8."""
    model = models_mixmim.mixmim_tiny(img_size=32, norm_pix_loss=True)
    imgs = torch.zeros(2, 3, 32, 32, dtype=torch.float64)
    n = 16 * 16 * 3  # the loss's patches are 16x16 pixels: 4 per 32x32 image
    rec, mask = torch.zeros(4, 4, n, dtype=torch.float64), torch.ones(1, 4, 1, dtype=torch.float64)
    assert model.forward_loss(imgs, rec, mask).item() == 0.0
    checker = 1 - 2 * ((torch.arange(16)[:, None] + torch.arange(16)) % 2)
    imgs[1, 2, :16, :16] = 1e-3 * checker.double()  # +-1e-3 in one patch of image 1
    v = 256 * 1e-6 / (n - 1)
    expected = (n - 1) / n * v / (v + 1e-6) / 8  # one patch of 2 images x 4 patches
    assert model.forward_loss(imgs, rec, mask).item() == pytest.approx(expected, rel=1e-12)


def test_patchify_round_trip():
    model = models_mixmim.mixmim_tiny()
    x = torch.randn(2, 3, 64, 64)
    p = model.patchify(x)
    assert p.shape == (2, 16, 16 * 16 * 3)
    assert torch.equal(model.unpatchify(p), x)
    # the official layout: patches row-major, each patch's pixels (row, column, channel)
    assert torch.equal(p[0, 1], x[0, :, 0:16, 16:32].permute(1, 2, 0).reshape(-1))
    assert torch.equal(p[1, 4], x[1, :, 16:32, 0:16].permute(1, 2, 0).reshape(-1))


# ---------------------------------------------------------------------------------------------- attention paths


def test_sdpa_and_plain_attention_agree(monkeypatch):
    """The training run (mixing mask and relative-position bias) on both paths; the SDPA path does call
    F.scaled_dot_product_attention in each of the 5 encoder blocks, the plain one in none (the 2 decoder blocks,
    timm's, always do)."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    torch.manual_seed(0)
    plain = models_mixmim.mixmim_tiny(fused_attn=False)
    fused = models_mixmim.mixmim_tiny(fused_attn=True)
    fused.load_state_dict(plain.state_dict())
    x = seeded_images()
    outs = []
    for model, expected_calls in ((plain, 2), (fused, 2 + 5)):
        calls.clear()
        torch.manual_seed(2)
        random.seed(2)
        loss, x_rec, _ = model(x)
        assert len(calls) == expected_calls
        loss.backward()
        outs.append((loss, x_rec, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l1, r1, g1), (l2, r2, g2) = outs
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
    torch.testing.assert_close(r1, r2, rtol=0, atol=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=0, atol=1e-5, msg=n)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_and_plain_attention_agree_on_cuda():
    """On CUDA the SDPA path (a memory-efficient kernel with the additive mask; 4x4 windows exercise the
    16-alignment padding) matches the plain path in fp32."""
    torch.manual_seed(0)
    plain = models_mixmim.mixmim_tiny(fused_attn=False).cuda()
    fused = models_mixmim.mixmim_tiny(fused_attn=True).cuda()
    fused.load_state_dict(plain.state_dict())
    x = seeded_images().cuda()
    noise = torch.rand(16, device="cuda")
    (l1, r1, _), (l2, r2, _) = plain(x, noise=noise), fused(x, noise=noise)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-4)
    for (n, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_attention_path_is_chosen_when_built(monkeypatch):
    """As timm's attention: fused_attn given to the factory, else timm's use_fused_attn() at construction."""
    import timm.layers.config

    def attn_of(**kw):
        return models_mixmim.mixmim_tiny_ft(**kw).layers[0].blocks[0].attn

    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)  # what TIMM_FUSED_ATTN=0 sets
    assert attn_of().fused_attn is False and attn_of(fused_attn=True).fused_attn is True
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 1)
    assert attn_of().fused_attn is True and attn_of(fused_attn=False).fused_attn is False


def test_mix_mask_blocks_exactly_cross_image_pairs():
    mask = torch.zeros(1, 8 * 8, 1)
    mask.view(8, 8)[:4, 4:] = 1  # top-right quadrant from the partner image
    mm = models_mixmim.window_mix_mask(mask, 8, 8, 4)  # 4 windows, one per quadrant
    assert mm.shape == (4, 1, 16, 16)
    assert torch.all(mm == 0)  # every 4x4 window lies in one image
    mm = models_mixmim.window_mix_mask(mask, 8, 8, 8)  # one window: 16 partner tokens, 48 own tokens
    blocked = torch.isinf(mm[0, 0])
    assert blocked.sum() == 2 * 16 * 48 and not blocked.diagonal().any()


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    """use_checkpoint runs each encoder block (depths 1, 1, 2, 1: five) through torch.utils.checkpoint, with the
    gradients of the plain run."""
    calls = []
    real = models_mixmim.checkpoint
    monkeypatch.setattr(models_mixmim, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch.manual_seed(0)
    a = models_mixmim.mixmim_tiny()
    b = models_mixmim.mixmim_tiny(use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = seeded_images(2)
    for model, expected_calls in ((a, 0), (b, 5)):
        calls.clear()
        model(x, noise=torch.arange(16.0))[0].backward()
        assert len(calls) == expected_calls
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------------- factories and sizes


def test_tiny_models_on_32x32_train_every_parameter():
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny(img_size=32)
    x = torch.randn(2, 3, 32, 32)
    loss, x_rec, mask = model(x)
    loss.backward()
    assert x_rec.shape == (4, 4, 16 * 16 * 3) and mask.shape == (1, 4, 1)
    assert mask.sum().item() == 2  # mask ratio 0.5 of the 4 output patches
    target = model.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    unmixed = x_rec[:2] * mask + x_rec[2:].flip(0) * (1 - mask)  # the official forward_loss, written out
    assert loss.item() == pytest.approx(((unmixed - target) ** 2).mean().item(), rel=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    clf = timm.create_model("mixmim_tiny_ft", num_classes=7, drop_path_rate=0.1, img_size=32)
    y = clf(x)
    y.sum().backward()
    assert y.shape == (2, 7)
    for name, p in clf.named_parameters():
        if p.requires_grad:  # the fixed sin-cos table is not
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_state_dicts_load_strictly(name):
    """Key names and shapes of every size equal the official models' (recorded from the official code)."""
    official = OFFICIAL_KEYS[name]
    with torch.device("meta"):
        model = timm.create_model(name, **({"num_classes": 1000} if name.endswith("_ft") else {}))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    state = {k: torch.empty(s, device="meta") for k, s in official.items()}
    model.load_state_dict(state, strict=True, assign=True)


def test_finetune_names_resolve_to_classifiers():
    """The official fine-tuning scripts' names (--model mixmim_base ...) are our *_ft classifiers."""
    expected = {
        "mixmim_base": "mixmim_base_ft",
        "mixmim_base_384": "mixmim_base_384_ft",
        "mixmim_large": "mixmim_large_ft",
        "mixmim_large_384": "mixmim_large_384_ft",
        "mixmim_huge": "mixmim_huge_ft",
        "mixmim_tiny": "mixmim_tiny_ft",
    }
    for official, ours in expected.items():
        assert timm.is_model(official) == (not official.endswith("_384"))
        assert resolve_classifier_name(official) == ours
        with torch.device("meta"):
            model = timm.create_model(ours, num_classes=5, drop_path_rate=0.1)
        assert isinstance(model, models_mixmim.MixMIMClassifier) and model.head.out_features == 5
    assert resolve_classifier_name("mixmim_base_ft") == "mixmim_base_ft"
    assert models_mixmim.mixmim_base_ft().no_weight_decay() == set()


def test_interpolation_224_to_384_matches_official():
    """util.pos_embed.interpolate_pos_embed_mixmim on the same checkpoint gives the official function's values,
    and a full 224 checkpoint then has exactly the official 384 model's shapes."""
    g = torch.Generator().manual_seed(0)
    ckpt = {
        k: (torch.randn(s, generator=g) if "index" not in k else torch.zeros(s, dtype=torch.long))
        for k, s in OFFICIAL_KEYS["mixmim_base"].items()
        if "relative_position" in k or "pos_embed" in k or k.startswith("layers.3.blocks.1.")
    }
    with torch.device("meta"):
        model = models_mixmim.mixmim_base_384_ft()
    interpolate_pos_embed_mixmim(model, ckpt)
    assert ckpt.keys() == OFFICIAL_INTERP.keys()
    for k, v in OFFICIAL_INTERP.items():
        assert list(ckpt[k].shape) == v["shape"], k
        assert [ckpt[k].double().sum().item(), ckpt[k].double().norm().item()] == pytest.approx(
            [v["sum"], v["norm"]], rel=1e-5, abs=1e-4
        ), k
        # values at 16 fixed positions: a transposed grid or another interpolation mode keeps sum and norm
        # (nearly) but moves these
        torch.testing.assert_close(ckpt[k].flatten()[v["at"]], torch.tensor(v["values"]), rtol=0, atol=2e-5, msg=k)

    official_384 = OFFICIAL_KEYS["mixmim_base_384_ft"]
    full = {k: torch.zeros(s) for k, s in OFFICIAL_KEYS["mixmim_base_ft"].items()}
    interpolate_pos_embed_mixmim(model, full)
    rebuilt = {k for k in official_384 if k.endswith("relative_position_index")}
    assert full.keys() == official_384.keys() - rebuilt
    assert {k: list(v.shape) for k, v in full.items()} == {k: official_384[k] for k in full}


def test_lr_decay_groups_equal_official():
    with torch.device("meta"):
        model = models_mixmim.mixmim_base_ft(num_classes=1000, drop_path_rate=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.7)
    ours = [
        {"lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"], "params": [names[id(p)] for p in g["params"]]}
        for g in groups
    ]
    assert len(ours) == len(OFFICIAL_LRD)
    for a, b in zip(ours, OFFICIAL_LRD, strict=True):
        assert a["params"] == b["params"]
        assert a["lr_scale"] == pytest.approx(b["lr_scale"], rel=1e-12)
        assert a["weight_decay"] == b["weight_decay"]
