"""Batched clip loading through NVIDIA DALI: NVDEC decoding on the GPU, or DALI's CPU operators."""
from __future__ import annotations

import logging
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from .dali_reader import _frame_pipeline, check_codec, import_dali
from .errors import VideoDecodeError
from .loader import PADDING, ShardedSampler
from .pyav_reader import probe_stream
from .sampling import sample_indices

log = logging.getLogger(__name__)


class _Entry(NamedTuple):
    """One batch slot as fed to DALI; ``path`` is None for the invalid placeholder."""
    path: Optional[str]
    enc: np.ndarray  # the encoded file
    idx: np.ndarray  # frame indices, int32
    pos: np.ndarray  # crop position (y, x) as fractions of the free room
    mirror: np.int32
    label: int
    index: int  # dataset index actually used (a replacement in training), PADDING for padding
    valid: bool
    failures: int  # files that failed on the way to this entry


class DaliVideoLoader:
    """Batches like :class:`~stop_fast.data.loader.VideoLoader`, decoded and transformed by DALI:
    NVDEC on the GPU (``device="gpu"``) or DALI's CPU operators (``device="cpu"``).

    Encoded bytes, per-sample frame indices, crop positions and flips are fed by the host each batch
    (sampled exactly as the PyAV path does); DALI decodes the batch's videos in parallel, resizes the
    short side, crops, mirrors and normalises, and returns ``(B, T, 3, S, S)`` in ``dtype``.
    Bad data never ends an epoch: a file that fails the probe, has rotation metadata (which DALI
    ignores), or passes the probe but breaks DALI's decoder (found by decoding the failed batch's
    videos one at a time) is logged by name, counted in ``stats``, remembered, and replaced by
    another sample (training) or fed as an invalid placeholder (evaluation, ``valid=False``).
    Each video's codec, frame count and rotation are probed once (PyAV, demuxing and one frame) and
    remembered; pass the ``manifest`` written by ``stop-fast prepare`` to skip probing the files
    that have not changed since it was written (its bad files are skipped too). The host work of
    the next batch (probe, read, sample) runs on ``num_threads`` threads while DALI decodes the
    current batch's videos in parallel.
    """

    def __init__(self, dataset, num_frames: int, batch_size: int, size: int = 224, mode: str = "eval", seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str = "gpu", dtype: torch.dtype = torch.float32,
                 flip: Optional[bool] = None, num_threads: int = 4, manifest: Optional[str] = None,
                 max_replacements: int = 10):
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
        self.max_replacements = max_replacements
        self._probed: Dict[str, Tuple[str, int, int]] = {}  # path -> (codec, frames, rotation)
        self._bad: Dict[str, str] = {}  # path -> why it cannot be used
        if manifest:
            self._use_manifest(manifest)
        self._threads = ThreadPoolExecutor(max_workers=num_threads)
        self._copy_stream = None
        self._in_flight = False  # a scheduled batch whose output nobody has taken yet

    def _use_manifest(self, manifest) -> None:
        """Take codec, frame count and rotation from a ``prepare`` manifest instead of probing, for the
        files that have not changed since (same size and modification time); a changed file is
        probed again at run time, so a stale frame count never yields black clips marked valid."""
        from .prepare import is_current, read_manifest

        records = read_manifest(os.fspath(manifest))
        stale = 0
        for sample in self.dataset.samples:
            r = records.find(sample.path, getattr(self.dataset, "root", None))
            if r is None:
                continue
            if not is_current(r, sample.path):
                stale += 1
            elif r["ok"] and isinstance(r.get("codec"), str) and isinstance(r.get("frames"), int):
                self._probed[sample.path] = (r["codec"], r["frames"], r.get("rotation") or 0)
            elif not r["ok"]:
                self._bad[sample.path] = f"marked unreadable in {records.path}: {r.get('error')}"
        if stale:
            log.warning("%d videos changed since %s was written: probing them again", stale, records.path)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """``start_batch``: skip this epoch's first batches (resuming a run where it stopped)."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

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
        """(path, bytes, frame indices) of a sample, or a VideoDecodeError (remembered: a bad file is
        probed once, not once per epoch)."""
        path = self.dataset.samples[index].path
        if path in self._bad:
            raise VideoDecodeError(path, self._bad[path])
        try:
            if path not in self._probed:
                self._probed[path] = probe_stream(path)
            codec, total, rotation = self._probed[path]
            check_codec(path, codec, self.device == "gpu")
            if total == 0:
                raise VideoDecodeError(path, "the video stream holds no frames")
            if rotation % 360:
                raise VideoDecodeError(path, f"rotation metadata ({rotation} degrees), which DALI does not apply; re-encode "
                                             "with `stop-fast prepare --reencode-dir ...` (upright copies) or use VideoLoader")
            data = np.fromfile(path, dtype=np.uint8)
        except VideoDecodeError as exc:
            self._bad[path] = exc.reason
            raise
        except OSError as exc:
            self._bad[path] = f"cannot read the file ({exc})"
            raise VideoDecodeError(path, self._bad[path]) from exc
        except Exception as exc:  # noqa: BLE001 - whatever breaks on one file never ends the epoch
            self._bad[path] = f"unexpected {type(exc).__name__}: {exc}"
            log.debug("reading %s failed", path, exc_info=exc)
            raise VideoDecodeError(path, self._bad[path]) from exc
        return path, data, sample_indices(total, self.num_frames, self.mode, rng)

    def _entry(self, i: int) -> _Entry:
        """Everything DALI needs for sampler entry ``i``. Seeded by (seed, epoch, i), so neither thread
        order nor a retry after a failed batch changes what a sample draws."""
        rng = random.Random(hash((self.seed, self.epoch, i)))
        train = self.mode == "train"
        current, ok, failures = i, i != PADDING, 0
        item = None
        for _attempt in range(self.max_replacements + 1 if ok else 0):
            try:
                item = self._read(current, rng)
                break
            except VideoDecodeError as exc:
                failures += 1
                log.warning("skipping %s (%s)", exc.path, exc.reason)
                if not train:
                    ok = False
                    break
                current = rng.randrange(len(self.dataset))
        if item is None:
            if train:
                raise VideoDecodeError(self.dataset.samples[i].path,
                                       f"{failures} videos in a row failed to decode; is the dataset readable?")
            item = (None, *self._placeholder_item())
        crop = np.asarray([rng.random(), rng.random()] if train else [0.5, 0.5], dtype=np.float32)
        mirror = np.int32(train and self.flip and rng.random() < 0.5)
        # a file that failed in evaluation keeps its index (and label), flagged invalid, as in VideoLoader
        label = self.dataset.samples[current].label if current != PADDING else -1
        return _Entry(item[0], item[1], np.asarray(item[2], dtype=np.int32), crop, mirror, label, current, ok, failures)

    def _schedule(self, entries: List[_Entry]) -> None:
        """Feed a batch and start DALI on it (asynchronously; ``_collect`` takes the result)."""
        for name in ("enc", "idx", "pos", "mirror"):
            self._pipe.feed_input(name, [getattr(e, name) for e in entries])
        self._pipe.schedule_run()
        self._in_flight = True

    def _outputs(self):
        self._in_flight = False
        (out,) = self._pipe.outputs()
        return out

    def _decodes_alone(self, entry: _Entry) -> bool:
        pipe = _frame_pipeline(torch.cuda.current_device() if self.device == "gpu" else None)
        try:
            pipe.feed_input("enc", [entry.enc])
            pipe.feed_input("idx", [entry.idx])
            pipe.run()
            return True
        except Exception:
            return False

    def _collect(self, batch: List[int], entries: List[_Entry]):
        """The output of the scheduled batch. A file that passed the probe but breaks DALI's decoder
        fails the whole batch: find it by decoding the batch's videos one at a time, mark it bad,
        redraw its entries (a replacement in training, an invalid placeholder in evaluation), run again."""
        try:
            return self._outputs(), entries
        except Exception as exc:  # DALI raises RuntimeError; the bad file is found below
            error = exc
        for _round in range(len(batch) + 1):
            reason = f"DALI could not decode it ({str(error).strip().splitlines()[0]})"
            culprits = [j for j, e in enumerate(entries) if e.path is not None and not self._decodes_alone(e)]
            if not culprits:
                raise RuntimeError(f"DALI failed on a batch whose videos each decode alone: {[e.path for e in entries]}") from error
            for j in culprits:
                self._bad[entries[j].path] = reason
                log.warning("skipping %s (%s)", entries[j].path, reason)
                entries[j] = self._entry(batch[j])
            try:
                self._schedule(entries)
                return self._outputs(), entries
            except Exception as exc:
                error = exc
        raise RuntimeError("DALI kept failing on a batch after every bad file in it was replaced") from error

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

    def _copy_out(self, out) -> torch.Tensor:
        """DALI's output batch as a torch tensor of our own (DALI reuses its buffer on the next run).

        DALI writes fp32 or fp16; bf16 (the training dtype) is one cast afterwards. On the GPU the copy
        runs on a side stream that owns the new tensor's memory and is waited for on the host (a copy of
        a few MB, not the caller's queued work), so the next run may start at once; ``record_stream``
        keeps the memory from being reused while the caller's stream still reads it."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dali_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        if self.device == "cpu":
            video = torch.empty(out.shape(), dtype=dali_dtype)
            feed_ndarray(out, video)
            return video
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()
        with torch.cuda.stream(self._copy_stream):
            video = torch.empty(out.shape(), dtype=dali_dtype, device="cuda")
            feed_ndarray(out, video, cuda_stream=self._copy_stream)
        self._copy_stream.synchronize()
        video.record_stream(torch.cuda.current_stream())
        return video

    def __iter__(self):
        order = list(self.sampler)
        batches = [order[k : k + self.batch_size] for k in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        submit = lambda batch: [self._threads.submit(self._entry, i) for i in batch]  # noqa: E731
        if self._in_flight:  # an earlier epoch was left early: drop the batch it had started
            try:
                self._outputs()
            except Exception:
                pass
        if not batches:
            return
        entries = [f.result() for f in submit(batches[0])]
        self._schedule(entries)
        for k, batch in enumerate(batches):
            # the host work of the next batch (probe, read, sample) overlaps DALI's decoding of this one
            pending = submit(batches[k + 1]) if k + 1 < len(batches) else []
            out, entries = self._collect(batch, entries)
            out = out.as_tensor()
            video = self._copy_out(out)
            video = video.to(self.dtype)
            valid = torch.tensor([e.valid for e in entries], dtype=torch.bool)
            self.stats["clips"] += int(valid.sum())
            self.stats["failures"] += sum(e.failures for e in entries)
            result = {"video": video, "label": torch.tensor([e.label for e in entries], dtype=torch.long),
                      "index": torch.tensor([e.index for e in entries], dtype=torch.long), "valid": valid}
            if pending:  # DALI decodes batch k + 1 while the caller works on batch k
                entries = [f.result() for f in pending]
                self._schedule(entries)
            yield result
