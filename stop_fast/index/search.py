"""Exact cosine search over an index: :class:`VideoIndex` (open once, ask many questions) and
:func:`top_k`, the ranking itself.

Ranking: every row is scored, ``score = feature . query`` with the fp16-stored feature converted to
fp32 (exactly) and fp32 accumulation, one matmul per chunk of rows so that temporaries stay bounded
(``chunk_rows`` rows at a time, fewer when many queries are asked at once). The ``top`` best rows
come out by score, highest first, and equal scores in row order, i.e. by path: each (score, row) is
packed into one int64 whose order is that order (the fp32 score's bits made monotonic, then the row
reversed in the low 32 bits), so ``torch.topk`` over the keys is deterministic and the best of each
chunk merge with the best so far by the same rule.

Resident features: fp32 on a CPU (its fp16 matrix-vector product is slower there and rounds the
scores to fp16), fp16 on a GPU (half the memory; each chunk is converted on the fly). TF32 stays as
PyTorch leaves it (off for matmuls unless the process switched it on).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import store

CHUNK_ROWS = 1 << 18  # rows per matmul: 512 MiB of fp32 features at E = 512 (the GPU's converted chunk)
CHUNK_SCORES = 1 << 22  # scores per chunk over all queries (fewer rows per chunk for many queries)
_LOW = 1 << 32


@dataclasses.dataclass(frozen=True)
class Hit:
    """One answer: the video's path, its cosine similarity to the query, its row in the index."""

    path: str
    score: float
    row: int


@torch.no_grad()
def top_k(features: torch.Tensor, queries: torch.Tensor, k: int, chunk_rows: int = CHUNK_ROWS
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scores, rows)``, each (Q, min(k, N)): for every query (row of ``queries`` (Q, E)) the ``k``
    rows of ``features`` (N, E) with the highest dot product, highest first, ties by lower row."""
    if features.shape[0] >= _LOW:
        raise ValueError(f"an index of {features.shape[0]} rows is more than top_k ranks (2**32)")
    queries = queries.to(features.device, torch.float32)
    q, n = queries.shape[0], features.shape[0]
    step = max(1, min(chunk_rows, CHUNK_SCORES // max(q, 1)))
    best = torch.empty(q, 0, dtype=torch.int64, device=features.device)
    for start in range(0, n, step):
        scores = (features[start : start + step].float() @ queries.T).T  # (Q, c), fp32 accumulation
        rows = torch.arange(start, start + scores.shape[1], device=features.device)
        keys = torch.cat([best, _keys(scores, rows)], dim=1)
        best = keys.topk(min(k, keys.shape[1]), dim=1).values  # keys are unique: no tie to break
    return _unkey(best)


def _keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (score ascending, row descending)."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 and 0.0 are one score
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller int
    return ordered * _LOW + (_LOW - 1 - rows)


def _unkey(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = _LOW - 1 - torch.remainder(keys, _LOW)
    ordered = torch.div(keys, _LOW, rounding_mode="floor")
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return bits.view(torch.float32), rows


class VideoIndex:
    """A published index opened for search: its rows resident on ``device``, its model built on the
    first query that needs one (from what the index records: ``provenance.model_from_record``).

    ``VideoIndex.open("lib.idx").search_text("a dog catches a ball", top=10)`` -> ``[Hit, ...]``."""

    def __init__(self, folder: str, manifest: dict, rows: store.Rows, device: torch.device,
                 weights: Optional[str] = None):
        self.folder, self.manifest, self.device = folder, manifest, device
        self.paths: List[str] = rows.paths
        self.features = rows.features.to(device, torch.float32 if device.type == "cpu" else torch.float16)
        self._weights = weights
        self._model = None

    @classmethod
    def open(cls, path: Union[str, os.PathLike], device: str = "auto", weights: Optional[str] = None) -> "VideoIndex":
        """Open the index folder ``path`` on ``device`` (``auto``: CUDA when there is one). ``weights``:
        the backbone's weights file, when it is no longer where the index records it."""
        from ..devices import resolve_device

        folder = os.fspath(path)
        manifest, rows = store.load_index(folder)
        return cls(folder, manifest, rows, resolve_device(device, what="device"), weights)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def failed(self) -> List[dict]:
        """The videos the index could not decode: ``{"path", "size", "mtime_ns", "reason"}``."""
        return self.manifest["failed"]

    @property
    def embed_dim(self) -> int:
        return self.manifest["embed_dim"]

    # ------------------------------------------------------------------ search
    def search(self, queries: torch.Tensor, top: int = 10) -> List[List[Hit]]:
        """The ``top`` hits of each query feature (``(E,)`` or ``(Q, E)``, L2-normalised; a caption's
        from :meth:`encode_text`), best first."""
        _check_top(top)
        if not isinstance(queries, torch.Tensor) or queries.dim() not in (1, 2) or queries.shape[-1] != self.embed_dim:
            raise ValueError(f"queries must be a tensor (E,) or (Q, E) with E = {self.embed_dim}, got "
                             f"{tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__}")
        queries = queries.reshape(-1, self.embed_dim)
        if not torch.isfinite(queries).all():
            raise ValueError("queries contain NaN or infinite values")
        scores, rows = top_k(self.features, queries, top)
        scores, rows = scores.tolist(), rows.tolist()
        return [[Hit(self.paths[r], s, r) for s, r in zip(qs, qr)] for qs, qr in zip(scores, rows)]

    def search_text(self, caption: str, top: int = 10) -> List[Hit]:
        """The videos that best match ``caption``, best first."""
        return self.search(self.encode_text([caption]), top)[0]

    def search_video(self, path: Union[str, os.PathLike], top: int = 10) -> List[Hit]:
        """The videos most like the video file ``path`` (encoded as the index's videos were), best first."""
        return self.search(self.encode_video(path), top)[0]

    # ------------------------------------------------------------------ queries
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """(len(captions), E) fp32 features of the captions through the index's text tower, cut to the
        index's caption length, as evaluation and ``predict --text`` encode them."""
        from ..train.setup import autocast_for
        from ..train.tasks import encode_texts

        if isinstance(captions, str) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError("captions must be a list of non-empty strings")
        model, config = self._query_model()
        return encode_texts(model, list(captions), config.text_tokens, autocast_for(self.device, config.precision))

    @torch.no_grad()
    def encode_video(self, path: Union[str, os.PathLike]) -> torch.Tensor:
        """(1, E) fp32 feature of a video file, with the index's frames and views (its evaluation
        clip(s) and crop(s), averaged), decoded with PyAV."""
        from .encode import encode_file

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"query video {path}: no such file")
        model, config = self._query_model()
        return encode_file(model, config, path, self.device)

    def _query_model(self):
        """The index's model and config on this index's device (built once, on first use)."""
        if self._model is None:
            from .provenance import config_from_record, model_from_record

            config = config_from_record(self.manifest["provenance"], weights=self._weights,
                                        device=str(self.device)).resolved(self.device.type == "cuda")
            self._model = model_from_record(self.folder, self.manifest["provenance"], config, self.device)
        return self._model


def _check_top(top) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
