"""The two tasks of SPEC.md: their cached text features, losses and evaluation.

Action recognition: the class texts ``"a video of a person doing {class}"`` go through the frozen text
tower once (class names as words where the dataset writes them otherwise: :func:`class_words`);
logits are ``100 * cos(video, class)``; cross-entropy. Text-video retrieval: every caption of the
split goes through the frozen text tower once (cut to ``caption_tokens``); each training video draws
one of its captions per epoch, or every caption is a training pair of its own (:func:`caption_pairs`);
symmetric InfoNCE over the batch gathered from all ranks, where two pairs of one video are never
each other's negatives.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import re
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


def class_words(name: str) -> str:
    """A dataset's class name as the words a caption would use: UCF101's CamelCase
    (``ApplyEyeMakeup`` -> ``apply eye makeup``), HMDB51's underscores (``brush_hair`` -> ``brush
    hair``), Something-Something's placeholders (``Pushing [something] from left to right`` ->
    ``pushing something from left to right``); Kinetics names are words already. As ActionCLIP and
    X-CLIP write their class texts."""
    words = name.replace("_", " ").replace("[", "").replace("]", "")
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", words)
    return " ".join(words.split()).lower()


def class_texts(classes: Sequence[str], template: str, style: str) -> List[str]:
    """The class texts of ``classes`` (``style``: ``raw`` names as given, ``words``: :func:`class_words`)."""
    return [template.format(class_words(c) if style == "words" else c) for c in classes]


def class_list(train_classes: Sequence[str], val_classes: Sequence[str]) -> List[str]:
    """Training classes, then any class that only the evaluation split names (CSV splits list their
    own classes; zero-shot evaluation may name classes never trained on)."""
    seen = set(train_classes)
    return list(train_classes) + [c for c in val_classes if c not in seen]


class RecognitionTask:
    name = "recognition"

    def __init__(self, model, classes: Sequence[str], template: str, autocast, class_names: str = "raw"):
        if not classes:
            raise ValueError("the dataset names no classes")
        self.classes = list(classes)  # raw names: what outputs and metrics show
        texts = class_texts(self.classes, template, class_names)
        self.class_features = encode_texts(model, texts, None, autocast)  # (C, E)
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
    """Every caption of a split, encoded once: ``features`` (Q, E), for each sample the range of its
    captions (``offsets``, ``counts``), and for each caption the video it describes (``video``: one
    id per distinct video file, so that two samples of one video share it)."""

    def __init__(self, model, dataset, max_tokens: int, autocast):
        texts, offsets, counts, video, ids = [], [], [], [], {}
        for s in dataset.samples:
            offsets.append(len(texts))
            counts.append(len(s.captions))
            texts.extend(s.captions)
            video.extend([ids.setdefault(s.path, len(ids))] * len(s.captions))
        self.offsets = torch.tensor(offsets, dtype=torch.long)
        self.counts = torch.tensor(counts, dtype=torch.long)
        self.video = torch.tensor(video, dtype=torch.long)
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
        caps = self.train_captions
        text = caps.features[batch["target"]]  # (B, E), no gradient (frozen tower)
        video = distributed.gather_with_local_grad(features, info)  # (W * B, E)
        text = distributed.gather_rows(text, info)
        owner = distributed.gather_rows(caps.video.to(batch["target"].device)[batch["target"]], info)  # (W * B,)
        logits = LOGIT_SCALE * video @ text.T  # (videos, captions)
        # two pairs of one video (every caption a pair) are not each other's negatives
        same = (owner[:, None] == owner[None, :]) & ~torch.eye(len(owner), dtype=torch.bool, device=owner.device)
        logits = logits.masked_fill(same, float("-inf"))
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
        dataset = dataclasses.replace(dataset, samples=kept)
    return dataset, dropped


def caption_pairs(dataset):
    """Every caption a training pair of its own (CLIP4Clip's MSR-VTT protocol): one sample per
    (video, caption), so an epoch sees each caption once and each video as often as it has captions."""
    samples = [dataclasses.replace(s, captions=(c,)) for s in dataset.samples for c in s.captions]
    return dataclasses.replace(dataset, samples=samples)
