"""Position embeddings: official sin-cos numbers and resizing to another resolution."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models_vit
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed

ASSETS = Path(__file__).parent / "assets"
GOLDEN = json.loads((ASSETS / "mae_golden.json").read_text())["sincos_64_8_cls"]
# the official util.pos_embed.interpolate_pos_embed on torch.randn(1, 1 + 5 * 5, 6) (seed 0), to a 7x7 grid
OFFICIAL_INTERP = json.loads((ASSETS / "mae_official_interp.json").read_text())


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


def test_interpolate_equals_the_official_function():
    """5x5 -> 7x7 (a factor that is not an integer): the official function's values, cls token untouched."""
    old = torch.randn(1, 1 + 5 * 5, 6, generator=torch.Generator().manual_seed(0))
    model = SimpleNamespace(patch_embed=SimpleNamespace(num_patches=7 * 7), pos_embed=torch.zeros(1, 1 + 49, 6))
    ckpt = {"pos_embed": old.clone()}
    interpolate_pos_embed(model, ckpt)
    expected = torch.tensor(OFFICIAL_INTERP["output"]).view(1, 1 + 49, 6)
    torch.testing.assert_close(ckpt["pos_embed"], expected, rtol=0, atol=2e-6)


def test_interpolate_keeps_rows_as_rows():
    """Token k of a G x G grid is row k // G, column k % G: an embedding that is the row index in channel 0 and the
    column index in channel 1 stays so after resizing (up to the grid's scale), so rows and columns are not swapped
    and the order of tokens is kept."""
    old_size, new_size = 4, 6
    rows, cols = torch.meshgrid(torch.arange(float(old_size)), torch.arange(float(old_size)), indexing="ij")
    old = torch.stack([rows.flatten(), cols.flatten()], dim=-1)[None]  # (1, 16, 2)
    old = torch.cat([torch.full((1, 1, 2), -7.0), old], dim=1)
    model = SimpleNamespace(patch_embed=SimpleNamespace(num_patches=new_size**2), pos_embed=torch.zeros(1, 37, 2))
    ckpt = {"pos_embed": old}
    interpolate_pos_embed(model, ckpt)
    new = ckpt["pos_embed"][0, 1:].view(new_size, new_size, 2)
    # channel 0 depends on the row only and grows down the rows; channel 1 likewise along the columns
    torch.testing.assert_close(new[..., 0], new[:, :1, 0].expand(new_size, new_size))
    torch.testing.assert_close(new[..., 1], new[:1, :, 1].expand(new_size, new_size))
    assert (new[1:, 0, 0] > new[:-1, 0, 0]).all() and (new[0, 1:, 1] > new[0, :-1, 1]).all()
    assert ckpt["pos_embed"][0, 0].tolist() == [-7.0, -7.0]


def test_rectangular_sincos_equals_the_square_one_and_the_formula():
    """(Gh, Gw) = (8, 8) gives the official square numbers; for (3, 5) the token of row r, column c holds
    sin/cos(c * w_i) in the first half and sin/cos(r * w_i) in the second, w_i = 10000^(-i / (D/4))."""
    np.testing.assert_array_equal(
        get_2d_sincos_pos_embed(64, (8, 8), cls_token=True), get_2d_sincos_pos_embed(64, 8, True)
    )
    pe = get_2d_sincos_pos_embed(64, (8, 8), cls_token=True)
    np.testing.assert_allclose(pe[9, :16], GOLDEN["row9"], rtol=1e-12)
    np.testing.assert_allclose(pe[63, 40:56], GOLDEN["row63"], rtol=1e-12)

    D = 16
    pe = get_2d_sincos_pos_embed(D, (3, 5))
    assert pe.shape == (15, D)
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    for r in range(3):
        for c in range(5):
            expected = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
            np.testing.assert_allclose(pe[r * 5 + c], expected, rtol=1e-6, atol=1e-7)
