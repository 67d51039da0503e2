"""Batched clip loading through NVIDIA DALI: NVDEC decoding on the GPU, or DALI's CPU operators."""
from __future__ import annotations

import logging
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from .dali_reader import check_codec, import_dali, video_codec
from .errors import VideoDecodeError
from .loader import PADDING, ShardedSampler
from .pyav_reader import count_frames
from .sampling import sample_indices

log = logging.getLogger(__name__)


class DaliVideoLoader:
    """Batches like :class:`~stop_fast.data.loader.VideoLoader`, decoded and transformed by DALI:
    NVDEC on the GPU (``device="gpu"``) or DALI's CPU operators (``device="cpu"``).

    Encoded bytes, per-sample frame indices, crop positions and flips are fed by the host each batch
    (sampled exactly as the PyAV path does); DALI decodes the batch's videos in parallel, resizes the
    short side, crops, mirrors and normalises, and returns ``(B, T, 3, S, S)`` in ``dtype``.
    Files that fail the probe are logged, counted and replaced (training) or fed as an invalid
    placeholder (evaluation, ``valid=False``). Each video's codec and frame count are probed once
    (PyAV, demuxing only) and remembered; pass the ``manifest`` written by ``stop-fast prepare`` to
    skip probing altogether. The host work of a batch (probe, read, sample) runs on ``num_threads``
    threads while DALI decodes the batch's videos in parallel.
    """

    def __init__(self, dataset, num_frames: int, batch_size: int, size: int = 224, mode: str = "eval", seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str = "gpu", dtype: torch.dtype = torch.float32,
                 flip: Optional[bool] = None, num_threads: int = 4, manifest: Optional[str] = None):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise ValueError("device='gpu' needs a CUDA device; use device='cpu'")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dataset, self.num_frames, self.batch_size, self.size, self.mode = dataset, num_frames, batch_size, size, mode
        self.seed, self.device, self.dtype = seed, device, dtype
        self.flip = dataset.allow_flip if flip is None else flip
        self.sampler = ShardedSampler(len(dataset), batch_size, mode, rank, world_size, seed)
        self.stats = {"clips": 0, "failures": 0}
        self.epoch = 0
        self._pipe = self._build(num_threads)
        self._placeholder: Optional[Tuple[np.ndarray, int]] = None
        self._placeholder_lock = threading.Lock()
        self._probed: Dict[str, Tuple[str, int]] = {}  # path -> (codec, frames)
        if manifest:
            from .prepare import read_manifest

            self._probed = {p: (r["codec"], r["frames"]) for p, r in read_manifest(manifest).items() if r["ok"]}
        self._threads = ThreadPoolExecutor(max_workers=num_threads)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _build(self, num_threads: int):
        fn, types, pipeline_def = import_dali()
        gpu = self.device == "gpu"
        mean = [255 * m for m in OPENAI_DATASET_MEAN]
        std = [255 * s for s in OPENAI_DATASET_STD]

        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads,
                      device_id=torch.cuda.current_device() if gpu else None, prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            idx = fn.external_source(name="idx", dtype=types.INT32, ndim=1)
            pos = fn.external_source(name="pos", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            frames = fn.decoders.video(enc, device="mixed" if gpu else "cpu", frames=idx)
            frames = fn.resize(frames, resize_shorter=self.size, antialias=True)
            return fn.crop_mirror_normalize(
                frames, crop=(self.size, self.size), crop_pos_x=pos[1], crop_pos_y=pos[0], mirror=mirror,
                mean=mean, std=std, output_layout="FCHW",
                dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT)

        p = pipe()
        p.build()
        return p

    def _read(self, index: int, rng: random.Random):
        """(bytes, frame indices) of a sample, or a VideoDecodeError."""
        path = self.dataset.samples[index].path
        if path not in self._probed:
            self._probed[path] = (video_codec(path), count_frames(path))
        codec, total = self._probed[path]
        check_codec(path, codec, self.device == "gpu")
        if total == 0:
            raise VideoDecodeError(path, "the video stream holds no frames")
        return np.fromfile(path, dtype=np.uint8), sample_indices(total, self.num_frames, self.mode, rng)

    def _entry(self, i: int):
        """Everything DALI needs for sampler entry ``i``: (bytes, frames, crop, mirror, label, index,
        valid, failures). Seeded by (seed, epoch, i), so thread order does not matter."""
        rng = random.Random(hash((self.seed, self.epoch, i)))
        current, ok, failures = i, i != PADDING, 0
        item = None
        for _attempt in range(11 if ok else 0):
            try:
                item = self._read(current, rng)
                break
            except VideoDecodeError as exc:
                failures += 1
                log.warning("skipping %s (%s)", exc.path, exc.reason)
                if self.mode != "train":
                    ok = False
                    break
                current = rng.randrange(len(self.dataset))
        if item is None:
            if self.mode == "train":
                raise VideoDecodeError(self.dataset.samples[i].path, "10 replacement videos in a row failed to decode")
            item = self._placeholder_item()
        train = self.mode == "train"
        crop = np.asarray([rng.random(), rng.random()] if train else [0.5, 0.5], dtype=np.float32)
        mirror = np.int32(train and self.flip and rng.random() < 0.5)
        # a file that failed in evaluation keeps its index (and label), flagged invalid, as in VideoLoader
        label = self.dataset.samples[current].label if current != PADDING else -1
        return item[0], np.asarray(item[1], dtype=np.int32), crop, mirror, label, current, ok, failures

    def _batch_inputs(self, indices: List[int]):
        entries = list(self._threads.map(self._entry, indices))
        self.stats["failures"] += sum(e[7] for e in entries)
        return tuple(list(column) for column in zip(*entries))[:7]

    def _placeholder_item(self):
        """A small generated VP9 clip fed in place of unreadable or padding entries (valid=False)."""
        with self._placeholder_lock:
            if self._placeholder is None:
                self._placeholder = self._make_placeholder()
        data, frames = self._placeholder
        return data, sample_indices(frames, self.num_frames, "eval")

    @staticmethod
    def _make_placeholder() -> Tuple[np.ndarray, int]:
        """Two black 64 x 64 VP9 frames: decodable by NVDEC and by DALI's CPU decoder alike."""
        import tempfile

        import av

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "placeholder.webm")
            with av.open(path, mode="w") as c:
                s = c.add_stream("libvpx-vp9", rate=8)
                s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
                for _ in range(2):
                    for packet in s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
                        c.mux(packet)
                for packet in s.encode():
                    c.mux(packet)
            return np.fromfile(path, dtype=np.uint8), 2

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        order = list(self.sampler)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            enc, idx, pos, mirror, labels, kept, valid = self._batch_inputs(order[start : start + self.batch_size])
            for name, data in (("enc", enc), ("idx", idx), ("pos", pos), ("mirror", mirror)):
                self._pipe.feed_input(name, data)
            (out,) = self._pipe.run()
            out = out.as_tensor()
            # DALI writes fp32 or fp16; bf16 (the training dtype) is one cast on the device
            dali_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
            video = torch.empty(out.shape(), dtype=dali_dtype, device="cuda" if self.device == "gpu" else "cpu")
            feed_ndarray(out, video, cuda_stream=torch.cuda.current_stream() if self.device == "gpu" else None)
            video = video.to(self.dtype)
            valid_t = torch.tensor(valid, dtype=torch.bool)
            self.stats["clips"] += int(valid_t.sum())
            yield {"video": video, "label": torch.tensor(labels), "index": torch.tensor(kept), "valid": valid_t}
