"""Fashion-MNIST as image folders on disk, to run the entry scripts on real grey images as on your own data.

    python scripts/fashion_mnist_folders.py OUT [--pretrain_images 12800] [--labelled_images 4096] [--test_images 2000]

writes one-channel 32x32 PNGs: ``OUT/unlabelled/`` (nested folders without classes, for ``main_pretrain.py``) and
``OUT/labelled/{train,val}/<class>/`` (an ImageFolder for ``main_knn.py``, ``main_linprobe.py``,
``main_finetune.py``), the images the demo picks with the same counts and ``--seed``
(``util.fashion_mnist.write_image_folders``). PRETRAIN.md, "Your own data", runs the demo's budget on them.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.dist import setup_logging  # noqa: E402
from util.fashion_mnist import DEFAULT_DATA_PATH, prepare_root, write_image_folders  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Fashion-MNIST as one-channel PNG folders")
    parser.add_argument("out", help="folder to write unlabelled/ and labelled/ into")
    parser.add_argument("--data_path", default=DEFAULT_DATA_PATH, help="folder holding the four Fashion-MNIST files")
    parser.add_argument("--cache_dir", default=None, help="where decompressed files go (default ~/.cache/mae-mixmim)")
    parser.add_argument("--pretrain_images", default=12800, type=int, help="train-split images, unlabelled")
    parser.add_argument("--labelled_images", default=4096, type=int, help="train-split images with labels")
    parser.add_argument("--test_images", default=2000, type=int, help="test-split images (10000: all)")
    parser.add_argument("--seed", default=0, type=int, help="the subsets' permutation (the demo's --seed)")
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    setup_logging(True)
    root = prepare_root(args.data_path, args.cache_dir)
    write_image_folders(root, args.out, args.pretrain_images, args.labelled_images, args.test_images, args.seed)
