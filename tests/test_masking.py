"""util/masking.py: the mask sampling strategies of the MAE paper's Table 1f (random, block, grid) as noise for MAE's
argsort masking, and the model's ``mask_type``."""

import math

import pytest
import timm
import torch

import models_mae
from util import masking

GRIDS = [(8, 8), (8, 12), (14, 14)]
RATIOS = {"random": [0.5, 0.75, 0.9], "block": [0.4, 0.5, 0.75, 0.9], "grid": [0.75]}


@pytest.fixture(scope="module")
def tiny() -> models_mae.MaskedAutoencoderViT:
    torch.manual_seed(0)
    return models_mae.mae_vit_tiny_patch4()


def hidden_of(tiny, noise: torch.Tensor, ratio: float) -> torch.Tensor:
    """The model's (N, L) mask (1 is removed) for ``noise``, and a check that its kept tokens are the unmasked ones."""
    N, L = noise.shape
    x = torch.arange(N * L, dtype=torch.float32).view(N, L, 1)
    kept, mask, _ = tiny.random_masking(x, ratio, noise)
    for i in range(N):
        assert sorted(kept[i, :, 0].tolist()) == x[i][mask[i] == 0, 0].tolist()
    return mask


def components(hidden: torch.Tensor) -> list[set[tuple[int, int]]]:
    """The 4-connected components of the True cells of a (H, W) bool grid."""
    H, W = hidden.shape
    todo = {(i, j) for i in range(H) for j in range(W) if hidden[i, j]}
    found = []
    while todo:
        stack, part = [todo.pop()], set()
        while stack:
            i, j = stack.pop()
            part.add((i, j))
            for n in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if n in todo:
                    todo.remove(n)
                    stack.append(n)
        found.append(part)
    return found


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("mask_type", masking.MASK_TYPES)
def test_every_type_keeps_exactly_len_keep_patches(tiny, mask_type, grid):
    g = torch.Generator().manual_seed(0)
    L = grid[0] * grid[1]
    for ratio in RATIOS[mask_type]:
        noise = masking.mask_noise(mask_type, 3, grid, ratio, generator=g)
        assert noise.shape == (3, L)
        mask = hidden_of(tiny, noise, ratio)
        assert mask.sum(1).tolist() == [L - int(L * (1 - ratio))] * 3


def test_grid_keeps_the_top_left_patch_of_every_2x2():
    expected = torch.tensor(
        [
            [0, 1, 0, 1],
            [1, 1, 1, 1],
            [0, 1, 0, 1],
            [1, 1, 1, 1],
        ]
    )
    assert torch.equal(masking.grid_mask((4, 4)).long(), expected)
    noise = masking.mask_noise("grid", 2, (4, 4), 0.75)
    assert torch.equal(noise.argsort(1)[:, :4].sort(1).values, torch.tensor([[0, 2, 8, 10]] * 2))
    assert torch.equal(masking.grid_mask((2, 6)).long(), torch.tensor([[0, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1]]))


@pytest.mark.parametrize(
    ("mask_type", "ratio", "grid", "message"),
    [
        ("blocks", 0.75, (8, 8), "mask_type must be one of random, block, grid, got 'blocks'"),
        ("grid", 0.5, (8, 8), "grid masking keeps one patch of every 2x2: it needs mask_ratio 0.75, got 0.5"),
        ("grid", 0.75, (7, 8), "grid masking needs a patch grid with even sides, got 7x8"),
    ],
)
def test_bad_choices_are_value_errors(mask_type, ratio, grid, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        masking.mask_noise(mask_type, 1, grid, ratio)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_block_rectangles_follow_beit(grid):
    """Each rectangle: drawn size s in [16, max(16, patches still to cover)], aspect ratio r in [0.3, 1/0.3], sides
    the smallest integers with h >= sqrt(s r) and w >= sqrt(s / r) (so at least s patches), inside the grid; the
    rectangles stop as soon as they cover the target."""
    H, W = grid
    L = H * W
    g = torch.Generator().manual_seed(1)
    aspects = []
    for ratio in (0.4, 0.75, 0.9):
        target = L - int(L * (1 - ratio))
        draws = masking.draw_blocks(grid, target, 20, g)
        for i in range(20):
            blocks = draws.rectangles(i)
            covered = torch.zeros(grid, dtype=torch.bool)
            for k, b in enumerate(blocks):
                assert 16 <= b.size <= max(16, target - covered.sum().item())
                assert 0.3 <= b.aspect <= 1 / 0.3
                assert b.height * b.width >= 16
                assert 0 <= b.top <= H - b.height and 0 <= b.left <= W - b.width
                if b.height < H and b.width < W:  # not clipped by the grid
                    assert b.height * b.width >= b.size
                    assert (b.height - 1) ** 2 < b.size * b.aspect <= b.height**2
                    assert (b.width - 1) ** 2 < b.size / b.aspect <= b.width**2
                before = covered.clone()
                covered[b.top : b.top + b.height, b.left : b.left + b.width] = True
                assert (covered.sum() >= target) == (k == len(blocks) - 1)
                aspects.append(math.log(b.aspect))
            # the batch's painting: the patches of the rectangles before the last, and the last one's
            assert torch.equal(torch.from_numpy(draws.earlier[i]), before)
            last = torch.zeros(grid, dtype=torch.bool)
            last[b.top : b.top + b.height, b.left : b.left + b.width] = True
            assert torch.equal(torch.from_numpy(draws.last[i]), last)
    # log-uniform: log r uniform on [log 0.3, -log 0.3], mean 0, a third of the draws within its middle third
    u = torch.tensor(aspects) / -math.log(0.3)
    assert len(u) > 150 and abs(u.mean()) < 0.1 and 0.25 < (u.abs() < 1 / 3).float().mean() < 0.42


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_block_masks_are_whole_rectangles_but_for_the_last(tiny, grid):
    """The mask of an image: its rectangles (drawn first, the batch's images in step, from the same generator), the last
    rectangle's new patches trimmed at random to the exact count. So every 4-connected masked region away from the
    last rectangle holds at least 16 patches (random masking leaves single patches)."""
    H, W = grid
    L = H * W
    ratio, n = 0.75, 4
    target = L - int(L * (1 - ratio))
    mask = hidden_of(
        tiny, masking.mask_noise("block", n, grid, ratio, generator=torch.Generator().manual_seed(5)), ratio
    )
    g = torch.Generator().manual_seed(5)
    draws = masking.draw_blocks(grid, target, n, g)
    for i in range(n):
        hidden = mask[i].view(H, W).bool()
        blocks = draws.rectangles(i)
        earlier, last = torch.zeros(H, W, dtype=torch.bool), torch.zeros(H, W, dtype=torch.bool)
        for b in blocks[:-1]:
            earlier[b.top : b.top + b.height, b.left : b.left + b.width] = True
        b = blocks[-1]
        last[b.top : b.top + b.height, b.left : b.left + b.width] = True
        assert (hidden & ~earlier & ~last).sum() == 0  # only block patches are hidden
        assert (earlier & ~hidden).sum() == 0  # earlier rectangles whole
        for part in components(hidden):
            if not any(last[p] for p in part):
                assert len(part) >= 16
    random_mask = hidden_of(tiny, torch.rand(n, L, generator=g), ratio)
    assert any(min(map(len, components(m.view(H, W).bool()))) < 16 for m in random_mask)


@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_seeded_generator_reproduces_masks_and_leaves_the_global_rng(mask_type):
    state = torch.get_rng_state()

    def noise(seed):
        return masking.mask_noise(mask_type, 4, (8, 12), 0.75, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(noise(3), noise(3))
    assert not torch.equal(noise(3).argsort(1)[:, :24].sort(1).values, noise(4).argsort(1)[:, :24].sort(1).values)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("img_size", [32, (32, 48)], ids=["8x8", "8x12"])
def test_forward_with_grid_masks_the_grid(img_size):
    torch.manual_seed(0)
    model = timm.create_model("mae_vit_tiny_patch4", mask_type="grid", img_size=img_size)
    assert model.mask_type == "grid"
    H, W = model.patch_embed.grid_size
    _, _, mask = model(torch.randn(2, 3, *model.patch_embed.img_size))
    cell = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # keep the top-left of every 2x2
    assert torch.equal(mask.view(2, H, W), cell.repeat(H // 2, W // 2).expand(2, -1, -1))


def test_forward_refuses_bad_choices():
    model = models_mae.mae_vit_tiny_patch4(mask_type="grid")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="needs mask_ratio 0.75, got 0.5"):
        model(x, mask_ratio=0.5)
    with pytest.raises(ValueError, match="needs mask_ratio 0.75"):  # explicit noise too
        model(x, mask_ratio=0.5, noise=torch.rand(1, 64))
    model.mask_type = "checkerboard"
    with pytest.raises(ValueError, match="mask_type must be one of random, block, grid, got 'checkerboard'"):
        model(x)


def test_random_is_the_official_draw():
    """The default model draws torch.rand(N, L) after the seed and keeps its K smallest, as the official code."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4()
    assert model.mask_type == "random"
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(7)
    loss, pred, mask = model(x)
    torch.manual_seed(7)
    noise = torch.rand(3, 64)
    expected = torch.ones(3, 64).scatter_(1, noise.argsort(1)[:, :16], 0.0)
    assert torch.equal(mask, expected)
    loss2, pred2, _ = model(x, noise=noise)
    assert torch.equal(loss, loss2) and torch.equal(pred, pred2)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(masking.mask_noise("random", 3, (8, 8), 0.75, generator=g), noise)


def test_forward_with_block_draws_from_the_global_cpu_rng():
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4(mask_type="block")
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(11)
    loss, _, mask = model(x)
    assert torch.isfinite(loss) and mask.sum(1).tolist() == [48, 48]
    noise = masking.mask_noise("block", 2, (8, 8), 0.75, generator=torch.Generator().manual_seed(11))
    assert torch.equal(mask, torch.ones(2, 64).scatter_(1, noise.argsort(1)[:, :16], 0.0))
