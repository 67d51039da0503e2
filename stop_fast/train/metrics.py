"""Evaluation metrics of both tasks, from a score matrix.

Tie rule (pessimistic): the rank of the right answer is 1 + the number of OTHER candidates that score
at least as high. A tie therefore never helps: a model whose scores are all equal ranks every right
answer last, not first (an optimistic rule would give it R@1 = 100%). Ranks start at 1.

Accuracies and recalls are percentages (0-100), as the paper reports them.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def ranks_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank of ``target[i]`` in row ``scores[i]``: (Q, C), (Q,) int -> (Q,) int64 >= 1."""
    right = scores.gather(1, target[:, None])  # (Q, 1)
    at_least = (scores >= right).sum(dim=1)  # counts the right answer itself once
    return at_least.to(torch.int64)


def summarise_ranks(ranks: torch.Tensor, prefix: str, recall_at: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """R@k (percent), median rank and mean rank of a vector of ranks."""
    ranks = ranks.double()
    out = {f"{prefix}_r{k}": float((ranks <= k).double().mean() * 100) for k in recall_at}
    out[f"{prefix}_median_rank"] = float(ranks.quantile(0.5))  # the mean of the two middle ranks when even
    out[f"{prefix}_mean_rank"] = float(ranks.mean())
    return out


def recognition_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Top-1, top-5 and mean per-class accuracy (over the classes present in ``labels``) and the
    cross-entropy of ``logits`` (N, C) against ``labels`` (N,)."""
    logits = logits.double()
    ranks = ranks_of(logits, labels)
    top1 = (ranks <= 1).double()
    per_class = [top1[labels == c].mean() for c in labels.unique()]
    return {
        "top1": float(top1.mean() * 100),
        "top5": float((ranks <= 5).double().mean() * 100),
        "mean_class_acc": float(torch.stack(per_class).mean() * 100),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def retrieval_metrics(similarity: torch.Tensor, caption_video: torch.Tensor) -> Dict[str, float]:
    """Both directions from ``similarity`` (Q captions, V videos) and ``caption_video`` (Q,), the video
    each caption describes (every video has at least one caption).

    Text to video: each caption ranks all videos; its own video's rank counts.
    Video to text: each video ranks all captions; its best-placed own caption counts, and its other
    own captions are not competitors (with one caption per video this is the plain transposed rank).
    """
    q, v = similarity.shape
    if caption_video.shape != (q,):
        raise ValueError(f"caption_video must have shape ({q},), got {tuple(caption_video.shape)}")
    counts = torch.bincount(caption_video, minlength=v)
    if counts.numel() != v or bool((counts == 0).any()):
        raise ValueError("every video needs at least one caption, and caption_video must index the videos")
    sim = similarity.double()
    t2v = ranks_of(sim, caption_video)
    own = torch.zeros(q, v, dtype=torch.bool, device=sim.device)
    own[torch.arange(q, device=sim.device), caption_video] = True
    best_own = sim.masked_fill(~own, float("-inf")).amax(dim=0)  # (V,)
    v2t = 1 + ((sim >= best_own[None, :]) & ~own).sum(dim=0)
    return {**summarise_ranks(t2v, "t2v"), **summarise_ranks(v2t, "v2t")}
