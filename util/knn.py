"""Weighted k-NN evaluation of frozen features, the DINO protocol: cosine similarity of L2-normalised features, the
k nearest training images vote for their label with weight exp(similarity / T).

Features are extracted with the encoder in eval mode (no masking) on each rank's shard of the images in dataset
order, then gathered, so every rank holds all of them and the result does not depend on the number of processes.
"""

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from util.amp import autocast
from util.checkpoint import load_pretrained_state
from util.datasets import CheckedImages, CheckedLoader, CollateSkippingBad
from util.dist import get_rank, get_world_size, is_dist_avail_and_initialized
from util.families import unwrap

logger = logging.getLogger(__name__)


def pooled_features(model: torch.nn.Module, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, D): the classifier's input (timm's ``forward_head(..., pre_logits=True)``), or with
    ``layer`` the mean over positions of that block's / stage's map (timm's ``forward_intermediates``)."""
    if layer is None:
        return model.forward_head(model.forward_features(images), pre_logits=True)
    (feature,) = model.forward_intermediates(images, indices=[layer], stop_early=True, intermediates_only=True)
    return feature.mean(dim=(2, 3))


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    amp: str = "none",
    num_workers: int = 0,
    layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) L2-normalised float32, labels (N,)) over ``dataset``, in dataset order, on every rank.

    The features are the classifier's input (timm's ``forward_head(..., pre_logits=True)``): the pooled, normalised
    tokens (ViT: the cls token after ``norm``, or ``fc_norm`` of the mean patch token; MixMIM: the mean token);
    with ``layer``, the average over positions of that block's (ViT) or stage's (MixMIM) map."""
    model.eval()
    world, rank = get_world_size(), get_rank()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)  # pads to equal shards
    checked = isinstance(dataset, CheckedImages)
    collate = CollateSkippingBad(dataset, substitute=False) if checked else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate)
    if checked:  # an unreadable file: BadImageError naming it (every image must count: no skipping here)
        loader = CheckedLoader(loader, skip=False, what=dataset.root)
    feats, labels = [], []
    for images, targets in loader:
        with autocast(device, amp):
            feats.append(pooled_features(model, images.to(device, non_blocking=True), layer).float())
        labels.append(torch.as_tensor(targets).to(device))
    local_f = F.normalize(torch.cat(feats), dim=1)  # (n, D)
    local_l = torch.cat(labels)  # (n,)
    if world == 1 or not is_dist_avail_and_initialized():
        return local_f.cpu(), local_l.cpu()
    gathered_f = [torch.empty_like(local_f) for _ in range(world)]
    gathered_l = [torch.empty_like(local_l) for _ in range(world)]
    dist.all_gather(gathered_f, local_f)
    dist.all_gather(gathered_l, local_l)
    n = len(dataset)
    out_f = torch.empty(n, local_f.shape[1], dtype=local_f.dtype, device=local_f.device)
    out_l = torch.empty(n, dtype=local_l.dtype, device=local_l.device)
    for r in range(world):  # rank r held indices r, r + world, ... (padded by wrapping around)
        idx = torch.tensor(list(DistributedSampler(dataset, num_replicas=world, rank=r, shuffle=False)))
        out_f[idx.to(out_f.device)] = gathered_f[r]
        out_l[idx.to(out_l.device)] = gathered_l[r]
    return out_f.cpu(), out_l.cpu()


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: list[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[int, torch.Tensor]:
    """The predicted class ranking of every test image for each k: {k: (M, min(5, C)) labels, best first}.

    Features are L2-normalised (N, D) / (M, D); labels (N,) in [0, C). Each of the k most similar training images
    votes for its label with weight exp(cosine / temperature).
    """
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    top = min(5, num_classes)
    out = {k: [] for k in ks}
    kmax = min(max(ks), len(train_labels))
    for start in range(0, len(test_features), chunk):
        sims = test_features[start : start + chunk] @ train_features.T  # (b, N) cosine similarities
        best, idx = sims.topk(kmax, dim=1)  # (b, kmax), most similar first
        neighbours = train_labels[idx]  # (b, kmax)
        weights = (best / temperature).exp()  # (b, kmax)
        for k in ks:
            votes = torch.zeros(len(idx), num_classes, dtype=weights.dtype)
            votes.scatter_add_(1, neighbours[:, :k], weights[:, :k])  # (b, C)
            out[k].append(votes.topk(top, dim=1).indices)
    return {k: torch.cat(v) for k, v in out.items()}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: list[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """{"knn_k{k}_acc1": %, "knn_k{k}_acc5": %} for each k."""
    ranked = knn_classify(train_features, train_labels, test_features, ks, temperature, num_classes)
    stats = {}
    for k, pred in ranked.items():
        hit = pred == test_labels[:, None]
        stats[f"knn_k{k}_acc1"] = 100.0 * hit[:, 0].float().mean().item()
        stats[f"knn_k{k}_acc5"] = 100.0 * hit.any(dim=1).float().mean().item()
    return stats


class PretrainingKNN:
    """k-NN of a pretraining model's encoder during pretraining (``main_pretrain.py --knn_freq``): its weights are
    copied into ``encoder``, the classifier of its architecture (as ``--finetune`` loads them), whose features are
    voted on. Call on every rank."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        train: Dataset,
        val: Dataset,
        ks: list[int],
        batch_size: int,
        device: torch.device,
        amp: str = "none",
        num_workers: int = 0,
    ):
        self.encoder = encoder.to(device)
        self.train, self.val, self.ks, self.batch_size = train, val, ks, batch_size
        self.device, self.amp, self.num_workers = device, amp, num_workers

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        source = unwrap(model)
        state = {k: v.detach().clone() for k, v in source.state_dict().items()}
        grid = tuple(source.patch_embed.grid_size) if hasattr(source.patch_embed, "grid_size") else None
        load_pretrained_state(self.encoder, state, "the pretraining model", head_init_std=None, grid=grid)
        args = (self.batch_size, self.device, self.amp, self.num_workers)
        train_f, train_l = extract_features(self.encoder, self.train, *args)
        val_f, val_l = extract_features(self.encoder, self.val, *args)
        num_classes = len(getattr(self.train, "classes", [])) or None
        return knn_accuracy(train_f, train_l, val_f, val_l, self.ks, num_classes=num_classes)
