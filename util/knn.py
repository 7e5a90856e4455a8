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
from util.errors import BadImageError
from util.families import unwrap
from util.metrics import MetricLogger

logger = logging.getLogger(__name__)


def pooled_features(model: torch.nn.Module, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, D): the classifier's input (timm's ``forward_head(..., pre_logits=True)``), or with
    ``layer`` the mean over positions of that block's / stage's map (timm's ``forward_intermediates``)."""
    if layer is None:
        return model.forward_head(model.forward_features(images), pre_logits=True)
    (feature,) = model.forward_intermediates(images, indices=[layer], stop_early=True, intermediates_only=True)
    return feature.mean(dim=(2, 3))


class _Indexed(Dataset):
    """``dataset``'s items with their index: ``(image, (label, index))``, so that the features of the images that
    were read can be put back in dataset order (unreadable ones skipped)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        sample, target = self.dataset[index]
        return sample, (target, index)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    amp: str = "none",
    num_workers: int = 0,
    layer: int | None = None,
    skip_bad_images: bool = False,
    print_freq: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features (N', D) L2-normalised float32, labels (N',), skipped) over ``dataset``, in dataset order, on every
    rank.

    The features are the classifier's input (timm's ``forward_head(..., pre_logits=True)``): the pooled, normalised
    tokens (ViT: the cls token after ``norm``, or ``fc_norm`` of the mean patch token; MixMIM: the mean token);
    with ``layer``, the average over positions of that block's (ViT) or stage's (MixMIM) map. An unreadable file
    stops with ``BadImageError`` naming it, or with ``skip_bad_images`` is left out (a warning): N' = N - skipped.
    ``print_freq``: a progress line every that many batches."""
    model.eval()
    world, rank = get_world_size(), get_rank()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)  # pads to equal shards
    checked = isinstance(dataset, CheckedImages)
    collate = CollateSkippingBad(dataset, substitute=False) if checked else None
    loader = DataLoader(
        _Indexed(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate
    )
    if checked:  # an unreadable file: BadImageError naming it, or a warning and left out
        loader = CheckedLoader(loader, skip=skip_bad_images, what=dataset.root, allow_empty=True)
    if print_freq:
        loader = MetricLogger().log_every(loader, print_freq, f"features of {getattr(dataset, 'root', 'the set')}:")
    feats, labels, indices = [], [], []
    for images, (targets, index) in loader:
        with autocast(device, amp):
            feats.append(pooled_features(model, images.to(device, non_blocking=True), layer).float())
        labels.append(torch.as_tensor(targets).to(device))
        indices.append(torch.as_tensor(index).to(device))
    distributed = world > 1 and is_dist_avail_and_initialized()
    # the feature width; 0 where nothing was read (a shard of unreadable files under skip_bad_images): the ranks
    # agree on it, so that they all go on to the gather, or all stop with the same error
    width = torch.tensor([feats[0].shape[1] if feats else 0], device=device)
    if distributed:
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
    width = int(width.item())
    if not width:
        raise BadImageError(f"{getattr(dataset, 'root', 'the set')}: no readable image (none of its {len(dataset)} "
                            "files could be read)")  # fmt: skip
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    local_f = F.normalize(torch.cat(feats), dim=1) if feats else torch.zeros(0, width, device=device)  # (n, D)
    local_l, local_i = (torch.cat(t) if t else empty for t in (labels, indices))  # (n,), (n,)
    if not distributed:
        return local_f.cpu(), local_l.cpu(), len(dataset) - len(local_i)
    # each rank's features padded to its shard's length (index -1: room left by unreadable images), gathered, and
    # put in dataset order
    shard, n = len(sampler), len(local_i)
    padded_f = local_f.new_zeros(shard, local_f.shape[1])
    padded_l, padded_i = local_l.new_zeros(shard), local_i.new_full((shard,), -1)
    padded_f[:n], padded_l[:n], padded_i[:n] = local_f, local_l, local_i
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in (padded_f, padded_l, padded_i)]
    for out, t in zip(gathered, (padded_f, padded_l, padded_i), strict=True):
        dist.all_gather(out, t)
    out_f = local_f.new_zeros(len(dataset), local_f.shape[1])
    out_l = local_l.new_zeros(len(dataset))
    read = torch.zeros(len(dataset), dtype=torch.bool, device=local_i.device)
    for f, labels_r, i in zip(*gathered, strict=True):  # rank r's images (padding repeats a few: same values)
        keep = i >= 0
        out_f[i[keep]], out_l[i[keep]], read[i[keep]] = f[keep], labels_r[keep], True
    return out_f[read].cpu(), out_l[read].cpu(), int((~read).sum())


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
    voted on. ``skip_bad_images``: unreadable files are left out (a warning) instead of stopping. Call on every
    rank."""

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
        skip_bad_images: bool = False,
    ):
        self.encoder = encoder.to(device)
        self.train, self.val, self.ks, self.batch_size = train, val, ks, batch_size
        self.device, self.amp, self.num_workers, self.skip_bad_images = device, amp, num_workers, skip_bad_images

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        source = unwrap(model)
        state = {k: v.detach().clone() for k, v in source.state_dict().items()}
        grid = tuple(source.patch_embed.grid_size) if hasattr(source.patch_embed, "grid_size") else None
        load_pretrained_state(self.encoder, state, "the pretraining model", head_init_std=None, grid=grid)
        args = (self.batch_size, self.device, self.amp, self.num_workers, None, self.skip_bad_images)
        train_f, train_l, _ = extract_features(self.encoder, self.train, *args)
        val_f, val_l, _ = extract_features(self.encoder, self.val, *args)
        num_classes = len(getattr(self.train, "classes", [])) or None
        return knn_accuracy(train_f, train_l, val_f, val_l, self.ks, num_classes=num_classes)
