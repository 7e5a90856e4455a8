"""ViT classifier: golden values from the official code, checkpoint compatibility with MAE and official weights."""

import json
from pathlib import Path

import pytest
import timm
import torch

import models_mae
import models_vit

ASSETS = Path(__file__).parent / "assets"
GOLDEN = json.loads((ASSETS / "mae_golden.json").read_text())
OFFICIAL_KEYS = json.loads((ASSETS / "mae_official_state_dict_keys.json").read_text())


@pytest.mark.parametrize("gp", [True, False])
def test_matches_official_golden_values(gp):
    gold = GOLDEN[f"vit_tiny_gp{int(gp)}"]
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch4(num_classes=10, global_pool=gp, drop_path_rate=0.1)
    sd = model.state_dict()
    assert sd.keys() == gold["init"].keys()
    for name, (s, n) in gold["init"].items():
        assert [sd[name].double().sum().item(), sd[name].double().norm().item()] == pytest.approx(
            [s, n], rel=1e-5, abs=1e-5
        ), name
    model.eval()
    torch.manual_seed(1)
    logits = model(torch.randn(4, 3, 32, 32))
    logits.square().sum().backward()
    torch.testing.assert_close(logits, torch.tensor(gold["logits"]), rtol=1e-4, atol=1e-5)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == gold["grad_norms"].keys()  # every parameter the official model trains, no more
    for name, g in gold["grad_norms"].items():
        assert model.get_parameter(name).grad.norm().item() == pytest.approx(g, rel=1e-4, abs=1e-7), name


@pytest.mark.parametrize("name", ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"])
@pytest.mark.parametrize("gp", [True, False])
def test_official_finetuned_keys_load_strictly(name, gp):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000, global_pool=gp)
    official = OFFICIAL_KEYS[name + ("" if gp else "_cls")]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(official.items())
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in official.items()}, strict=True, assign=True)


def test_mae_encoder_weights_load_with_only_head_missing():
    """An MAE checkpoint (decoder dropped) fits the classifier: only the head and fc_norm are new."""
    mae = models_mae.mae_vit_tiny_patch4()
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    vit = models_vit.vit_tiny_patch4(num_classes=10, global_pool=True)
    result = vit.load_state_dict(encoder, strict=False)
    assert sorted(result.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(result.unexpected_keys) == ["norm.bias", "norm.weight"]
    # the same encoder gives the same tokens as the MAE encoder with nothing masked (and the noise keeping the
    # patches in order), and the same cls-token features
    vit_cls = models_vit.vit_tiny_patch4(num_classes=0, global_pool=False)
    vit_cls.load_state_dict(encoder, strict=True)
    x = torch.randn(2, 3, 32, 32)
    latent, _, _ = mae.forward_encoder(x, mask_ratio=0.0, noise=torch.arange(64.0).expand(2, -1))
    torch.testing.assert_close(vit_cls.forward_features(x), latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vit_cls(x), latent[:, 0], rtol=1e-5, atol=1e-5)


def test_global_pool_and_cls_token_features():
    """As official: global pool = fc_norm(mean of the patch tokens after the last block), no final norm; cls token =
    norm(tokens)[:, 0]."""
    torch.manual_seed(0)
    gp = models_vit.vit_tiny_patch4(num_classes=7, global_pool=True)
    cls = models_vit.vit_tiny_patch4(num_classes=7, global_pool=False)
    cls.load_state_dict({k: v for k, v in gp.state_dict().items() if not k.startswith("fc_norm")}, strict=False)
    x = torch.randn(3, 3, 32, 32)

    def tokens(model):  # (B, 1 + L, D) after the last block, written out from the parts
        t = model.patch_embed(x)
        t = torch.cat([model.cls_token.expand(3, -1, -1), t], dim=1) + model.pos_embed
        for blk in model.blocks:
            t = blk(t)
        return t

    with torch.no_grad():
        pre_logits = {m: m.forward_head(m.forward_features(x), pre_logits=True) for m in (gp, cls)}
        torch.testing.assert_close(pre_logits[gp], gp.fc_norm(tokens(gp)[:, 1:].mean(dim=1)))
        torch.testing.assert_close(pre_logits[cls], cls.norm(tokens(cls))[:, 0])
        torch.testing.assert_close(gp(x), gp.head(pre_logits[gp]))
    # the official checkpoints' layout: a global-pool model has no final norm, a cls-token model no fc_norm
    assert not any(k.startswith("norm.") for k in gp.state_dict())
    assert not any(k.startswith("fc_norm.") for k in cls.state_dict())
    assert gp.no_weight_decay() == {"pos_embed", "cls_token"}


def test_drop_path_rate_is_linear_over_depth():
    model = models_vit.vit_tiny_patch4(drop_path_rate=0.5)
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0 for blk in model.blocks]
    assert rates == pytest.approx([0.5 * i / 5 for i in range(6)])
