"""Position embeddings: official sin-cos numbers and resizing to another resolution."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models_vit
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed

GOLDEN = json.loads((Path(__file__).parent / "assets" / "mae_golden.json").read_text())["sincos_64_8_cls"]


def test_sincos_equals_official_numbers():
    pe = get_2d_sincos_pos_embed(64, 8, cls_token=True)
    assert pe.shape == (65, 64)
    assert pe.sum() == pytest.approx(GOLDEN["sum"], rel=1e-12)
    assert np.abs(pe).sum() == pytest.approx(GOLDEN["abs_sum"], rel=1e-12)
    np.testing.assert_allclose(pe[9, :16], GOLDEN["row9"], rtol=1e-12)
    np.testing.assert_allclose(pe[63, 40:56], GOLDEN["row63"], rtol=1e-12)


def test_sincos_structure():
    pe = get_2d_sincos_pos_embed(32, 4)
    # first half encodes the column (w), second half the row (h): patch 4 starts the second row of 4
    np.testing.assert_array_equal(pe[0, :16], pe[4, :16])
    np.testing.assert_array_equal(pe[0, 16:], pe[3, 16:])
    assert not np.array_equal(pe[0, :16], pe[3, :16])
    # sin^2 + cos^2 = 1 for every frequency
    np.testing.assert_allclose(pe[:, :8] ** 2 + pe[:, 8:16] ** 2, 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="even"):
        get_2d_sincos_pos_embed(31, 4)


def test_interpolate_keeps_cls_and_reshapes():
    model = models_vit.vit_tiny_patch4(img_size=64)  # 16x16 grid
    old = torch.randn(1, 1 + 14 * 14, 192)
    ckpt = {"pos_embed": old.clone()}
    interpolate_pos_embed(model, ckpt)
    new = ckpt["pos_embed"]
    assert new.shape == model.pos_embed.shape == (1, 1 + 16 * 16, 192)
    assert torch.equal(new[:, :1], old[:, :1])
    # a constant field stays constant under bicubic interpolation
    ckpt = {"pos_embed": torch.ones(1, 1 + 14 * 14, 192)}
    interpolate_pos_embed(model, ckpt)
    torch.testing.assert_close(ckpt["pos_embed"], torch.ones(1, 257, 192))
    # same grid: untouched object
    same = {"pos_embed": torch.randn(1, 257, 192)}
    before = same["pos_embed"]
    interpolate_pos_embed(model, same)
    assert same["pos_embed"] is before
