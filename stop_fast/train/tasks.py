"""The two tasks of SPEC.md: their cached text features, losses and evaluation.

Action recognition: the class texts ``"a video of a person doing {class}"`` go through the frozen text
tower once; logits are ``100 * cos(video, class)``; cross-entropy. Text-video retrieval: every caption
of the split goes through the frozen text tower once (cut to ``caption_tokens``); each training video
draws one of its captions per epoch; symmetric InfoNCE over the batch gathered from all ranks.
"""
from __future__ import annotations

import logging
import random
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import distributed
from ..config import LOGIT_SCALE
from .metrics import recognition_metrics, retrieval_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], max_tokens, autocast, batch: int = 512) -> torch.Tensor:
    """Normalised features (len(texts), E), fp32, from the frozen text tower, ``batch`` texts at a time."""
    parts = []
    for i in range(0, len(texts), batch):
        with autocast():
            parts.append(model.encode_text(list(texts[i : i + batch]), max_tokens=max_tokens).float())
    return torch.cat(parts) if parts else torch.empty(0)


def class_list(train_classes: Sequence[str], val_classes: Sequence[str]) -> List[str]:
    """Training classes, then any class that only the evaluation split names (CSV splits list their
    own classes; zero-shot evaluation may name classes never trained on)."""
    seen = set(train_classes)
    return list(train_classes) + [c for c in val_classes if c not in seen]


class RecognitionTask:
    name = "recognition"

    def __init__(self, model, classes: Sequence[str], template: str, autocast):
        if not classes:
            raise ValueError("the dataset names no classes")
        self.classes = list(classes)
        self.class_features = encode_texts(model, [template.format(c) for c in self.classes], None, autocast)  # (C, E)
        self.loss_scale = 1.0  # each rank's mean over its videos; DDP's average makes it the global mean

    def labels_for(self, dataset) -> torch.Tensor:
        """The dataset's labels as indices into ``self.classes`` (matched by class name)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index[dataset.classes[s.label]] for s in dataset.samples], dtype=torch.long)

    def loss(self, features: torch.Tensor, batch: Dict, info) -> torch.Tensor:
        logits = LOGIT_SCALE * features @ self.class_features.T  # (B, C)
        return F.cross_entropy(logits, batch["target"])

    def targets(self, batch: Dict, labels: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
        return labels[batch["index"]]

    def evaluate(self, features: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        logits = LOGIT_SCALE * features[valid] @ self.class_features.T
        return recognition_metrics(logits, labels.to(features.device)[valid])


class Captions:
    """Every caption of a split, encoded once: ``features`` (Q, E), and for each video the range of
    its captions (``offsets``, ``counts``)."""

    def __init__(self, model, dataset, max_tokens: int, autocast):
        texts, offsets, counts = [], [], []
        for s in dataset.samples:
            offsets.append(len(texts))
            counts.append(len(s.captions))
            texts.extend(s.captions)
        self.offsets = torch.tensor(offsets, dtype=torch.long)
        self.counts = torch.tensor(counts, dtype=torch.long)
        self.features = encode_texts(model, texts, max_tokens, autocast)

    def owner(self) -> torch.Tensor:
        """(Q,) the video index of each caption."""
        return torch.repeat_interleave(torch.arange(len(self.counts)), self.counts)


class RetrievalTask:
    name = "retrieval"

    def __init__(self, model, train_set, val_set, max_tokens: int, autocast, world_size: int):
        self.max_tokens, self.autocast = max_tokens, autocast
        self.train_captions = Captions(model, train_set, max_tokens, autocast) if train_set is not None else None
        self.val_captions = Captions(model, val_set, max_tokens, autocast) if val_set is not None else None
        # every rank computes the same global loss but differentiates only its own videos; DDP then averages
        # the ranks' gradients, so the loss is scaled by the world size to give the single-process gradient
        self.loss_scale = float(world_size)

    def targets(self, batch: Dict, labels, epoch: int, seed: int) -> torch.Tensor:
        """One caption per video, drawn per (seed, epoch, video) so that resuming draws the same one."""
        caps = self.train_captions
        ids = []
        for i in batch["index"].tolist():  # a CPU tensor from the loader: no device sync
            # a string seed is hashed the same way in every process (tuple hashes of strings are not)
            pick = random.Random(f"caption/{seed}/{epoch}/{i}").randrange(int(caps.counts[i]))
            ids.append(int(caps.offsets[i]) + pick)
        return torch.tensor(ids, dtype=torch.long)

    def loss(self, features: torch.Tensor, batch: Dict, info) -> torch.Tensor:
        text = self.train_captions.features[batch["target"]]  # (B, E), no gradient (frozen tower)
        video = distributed.gather_with_local_grad(features, info)  # (W * B, E)
        text = distributed.gather_rows(text, info)
        logits = LOGIT_SCALE * video @ text.T  # (videos, captions)
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def evaluate(self, features: torch.Tensor, valid: torch.Tensor, labels=None) -> Dict[str, float]:
        """Videos that failed to decode are left out, and so are their captions."""
        caps = self.val_captions
        owner = caps.owner().to(features.device)
        valid = valid.to(features.device)
        keep_caption = valid[owner]
        new_index = torch.cumsum(valid.long(), 0) - 1  # old video index -> index among the valid ones
        sim = caps.features[keep_caption] @ features[valid].T  # (Q', V')
        return retrieval_metrics(sim, new_index[owner[keep_caption]])


def drop_captionless(dataset) -> Tuple[object, int]:
    """Retrieval training needs a caption per video: leave out videos that have none."""
    kept = [s for s in dataset.samples if s.captions]
    dropped = len(dataset.samples) - len(kept)
    if dropped:
        log.warning("%d of %d %s videos have no caption and are left out", dropped, len(dataset.samples), dataset.split)
        import dataclasses

        dataset = dataclasses.replace(dataset, samples=kept)
    return dataset, dropped
