"""The demo: Fashion-MNIST loading, and a fast demo run in which MAE pretraining beats random init on a probe."""

import gzip
import json
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo
import visualize
from util import reconstruction
from util.fashion_mnist import DEFAULT_DATA_PATH, FILES, FashionMNISTImages, prepare_root

HAVE_DATA = all((Path(DEFAULT_DATA_PATH) / f"{name}.gz").is_file() for name in FILES)
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"Fashion-MNIST not in {DEFAULT_DATA_PATH} (apt-get install dataset-fashion-mnist)"
)


def _write_idx(folder: Path, n: int, compress: bool) -> torch.Tensor:
    """A tiny Fashion-MNIST look-alike (n images per split, idx format); returns the train images (n, 28, 28)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    train_images = None
    for prefix in ("train", "t10k"):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        train_images = images if prefix == "train" else train_images
        blobs = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.numpy().tobytes(),
        }
        for name, blob in blobs.items():
            if compress:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(blob)
            else:
                (folder / name).write_bytes(blob)
    return train_images


@pytest.mark.parametrize("layout", ["gz", "plain", "torchvision"])
def test_prepare_root_reads_any_layout(tmp_path, layout):
    src = tmp_path / "src"
    folder = src / "FashionMNIST" / "raw" if layout == "torchvision" else src
    images = _write_idx(folder, 20, compress=layout == "gz")
    root = prepare_root(src, cache_dir=tmp_path / "cache")
    if layout == "torchvision":
        assert root == str(src.resolve())  # already readable: used as is
    else:
        assert root.startswith(str(tmp_path / "cache"))
    again = prepare_root(src, cache_dir=tmp_path / "cache")  # second call: nothing to do, same answer
    assert again == root
    dataset = FashionMNISTImages(root, train=True)
    assert len(dataset) == 20
    img, label = dataset[3]
    assert img.shape == (3, 32, 32) and label == 3
    # padded with 2 black pixels each side, the same grey in all channels, ImageNet-normalised
    pixels = img * torch.tensor(visualize.IMAGENET_STD).view(3, 1, 1) + torch.tensor(visualize.IMAGENET_MEAN).view(
        3, 1, 1
    )
    torch.testing.assert_close(pixels[:, 2:30, 2:30], images[3].float().div(255).expand(3, -1, -1), atol=1e-5, rtol=0)
    assert pixels[:, :2].abs().max() < 1e-5 and pixels[:, :, 30:].abs().max() < 1e-5


def test_prepare_root_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        prepare_root(tmp_path, cache_dir=tmp_path / "cache")


def test_subsets_and_sizes(tmp_path):
    _write_idx(tmp_path / "src", 50, compress=True)
    root = prepare_root(tmp_path / "src", cache_dir=tmp_path / "cache")
    a = FashionMNISTImages(root, train=True, num_samples=10, seed=1)
    b = FashionMNISTImages(root, train=True, num_samples=20, seed=1)
    assert torch.equal(a.targets, b.targets[:10])  # a smaller subset is a prefix of a larger one (same seed)
    assert torch.equal(a.images, b.images[:10])
    big = FashionMNISTImages(root, train=True, num_samples=10, seed=1, img_size=64)
    assert big[0][0].shape == (3, 64, 64)


@needs_data
def test_fast_demo_pretraining_beats_random_init(tmp_path):
    """A short demo run on real images: the MAE-pretrained linear probe beats random init by a wide margin.

    ~25 pretraining steps already lift the probe by well over 10 points on this slice (fixed seed); the asserted
    margin is 8. Fine-tuning gets one step here, so only its bookkeeping is checked.
    """
    torch.manual_seed(0)
    args = demo.get_args_parser().parse_args(
        [
            "--output_dir",
            str(tmp_path / "out"),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
            "--pretrain_images",
            "3200",
            "--pretrain_epochs",
            "1",
            "--labelled_images",
            "1000",
            "--test_images",
            "500",
            "--finetune_images",
            "128",
            "--finetune_epochs",
            "1",
            "--num_vis",
            "2",
        ]
    )
    results = demo.main(args)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert set(saved) == {"knn", "linprobe", "finetune"}
    for protocol in saved.values():
        assert set(protocol) == {"pretrained", "scratch"}
        assert all(0.0 <= v <= 100.0 for v in protocol.values())
    lp = saved["linprobe"]
    assert lp["pretrained"] > lp["scratch"] + 8.0, lp
    assert saved["knn"]["pretrained"] > saved["knn"]["scratch"], saved["knn"]  # frozen features, no training
    assert (out / "pretrain" / "checkpoint-last.pth").is_file()
    assert (out / "pretrain" / "checkpoint-0.pth").is_file()
    for stage in ("pretrain", "linprobe_pretrained", "linprobe_scratch", "finetune_pretrained", "finetune_scratch"):
        assert json.loads((out / stage / "args.json").read_text())["seed"] == 0
    log = [json.loads(line) for line in (out / "linprobe_pretrained" / "log.txt").read_text().splitlines()]
    assert len(log) == args.linprobe_epochs
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    for i in range(2):
        assert Image.open(out / f"reconstruction_{i}.png").size == reconstruction.panel_size(32, 32, 4)
    assert Image.open(out / "reconstructions.png").size[1] == 2 * reconstruction.panel_size(32, 32, 4)[1]
