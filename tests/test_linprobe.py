"""Linear probing as the official main_linprobe.py: the pretrained encoder stays frozen, only the probe trains.

The probe is BatchNorm1d(affine=False, eps=1e-6) + the linear head (weight re-initialised with std 0.01, MoCo v3),
trained with LARS; the rest of the model gets no gradient and keeps the pretrained values exactly.
"""

from pathlib import Path

import pytest
import torch
from train_utils import make_image_folder, parse, tiny_run_args

import main_linprobe
import models_vit
from model_table import add_probe_head, build_pretrain_model

FAMILIES = {"mae": ("mae_vit_tiny_patch4", "vit_tiny_patch4"), "mixmim": ("mixmim_tiny", "mixmim_tiny")}


def test_probe_head_is_batchnorm_without_affine_and_the_rest_is_frozen() -> None:
    model = models_vit.vit_tiny_patch4(num_classes=4)
    add_probe_head(model)
    bn, fc = model.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert bn.num_features == fc.in_features == 192
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_training_leaves_the_encoder_as_pretrained(tmp_path: Path, family: str) -> None:
    pretrain_name, classifier = FAMILIES[family]
    torch.manual_seed(0)
    pretrained = build_pretrain_model(pretrain_name, 32).state_dict()
    ckpt = tmp_path / "pretrained.pth"
    torch.save({"model": pretrained}, ckpt)
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)

    out = tmp_path / "probe"
    args = parse(
        main_linprobe.get_args_parser(),
        **tiny_run_args(data, out, model=classifier, finetune=ckpt, epochs=2, warmup_epochs=0, nb_classes=2, blr=1.0),
    )
    main_linprobe.main(args)
    probed = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]

    encoder = {k: v for k, v in probed.items() if not k.startswith("head.")}
    shared = encoder.keys() & pretrained.keys()
    assert len(shared) > 20
    for k in shared:
        assert torch.equal(encoder[k], pretrained[k]), f"{k} changed during linear probing"
    assert set(encoder) - shared <= {"fc_norm.weight", "fc_norm.bias"}  # MAE global pool only: not used here
    # the probe did train: BatchNorm statistics moved off their init, the head moved away from zero bias
    assert not torch.equal(probed["head.0.running_mean"], torch.zeros_like(probed["head.0.running_mean"]))
    assert probed["head.0.num_batches_tracked"] == 4  # 2 epochs x 2 steps
    assert probed["head.1.bias"].abs().sum() > 0
    # the head was re-initialised with trunc_normal(std 0.01) as MoCo v3 (LARS steps of a few 1e-3 relative since)
    assert 0.008 < probed["head.1.weight"].std().item() < 0.012
    assert "head.0.weight" not in probed  # no affine parameters
