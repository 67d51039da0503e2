"""Batched clip loading through NVIDIA DALI: NVDEC decoding on the GPU, or DALI's CPU operators."""
from __future__ import annotations

import collections
import logging
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Deque, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from .dali_reader import check_codec, decode_encoded, import_dali
from .errors import VideoDecodeError
from .loader import PADDING, ShardedSampler
from .manifest import Source, sources
from .probe import cached_probe
from .sampling import sample_indices

log = logging.getLogger(__name__)

# DALI pipelines on a GPU by default: one pipeline is reported to keep one NVDEC engine busy, and an
# H100 / H200 has seven. Not measured on a GPU yet (benchmarks/bench_decode.py's GPU rows will say).
GPU_PIPELINES = 4


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

    Throughput: ``num_pipelines`` DALI pipelines take batches in turn, each with ``prefetch`` batches
    queued, so up to ``num_pipelines * prefetch`` batches decode while the caller trains; the host
    work of the next batch (probe, read, sample) runs on ``num_threads`` threads meanwhile. On the GPU
    a batch is handed over without waiting on the host: DALI's outputs are bound to the caller's
    current CUDA stream and copied on it. One pipeline is reported to keep one NVDEC engine busy
    (DALI issue 6387) and H100 / H200 carry seven, hence several pipelines on the GPU by default
    (:data:`GPU_PIPELINES`, not measured on a GPU yet); on the CPU one pipeline, whose threads
    already decode a batch's videos in parallel.

    Bad data never ends an epoch: a file that fails the probe, has rotation metadata (which DALI
    ignores), or passes the probe but breaks DALI's decoder (found by decoding the failed batch's
    videos one at a time) is logged by name, counted in ``stats``, remembered, and replaced by
    another sample (training) or fed as an invalid placeholder (evaluation, ``valid=False``).
    Each video's codec, frame count and rotation come from the one probe of the file, once per
    process; with the ``manifest`` written by ``stop-fast prepare``, samples are read from their
    prepared copies (``use_prepared``) with the manifest's frame indexes and nothing is probed for
    files that have not changed since (its bad files are skipped too).
    """

    def __init__(self, dataset, num_frames: int, batch_size: int, size: int = 224, mode: str = "eval", seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str = "gpu", dtype: torch.dtype = torch.float32,
                 flip: Optional[bool] = None, num_threads: int = 4, manifest=None, max_replacements: int = 10,
                 prefetch: int = 2, num_pipelines: Optional[int] = None, use_prepared: bool = True):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise ValueError("device='gpu' needs a CUDA device; use device='cpu'")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        for name, value in (("prefetch", prefetch), ("num_threads", num_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if num_pipelines is None:
            num_pipelines = GPU_PIPELINES if device == "gpu" else 1
        if isinstance(num_pipelines, bool) or not isinstance(num_pipelines, int) or num_pipelines < 1:
            raise ValueError(f"num_pipelines must be an int >= 1, got {num_pipelines!r}")
        self.dataset, self.num_frames, self.batch_size, self.size, self.mode = dataset, num_frames, batch_size, size, mode
        self.seed, self.device, self.dtype = seed, device, dtype
        self.flip = dataset.allow_flip if flip is None else flip
        self.sampler = ShardedSampler(len(dataset), batch_size, mode, rank, world_size, seed)
        self.stats = {"clips": 0, "failures": 0}
        self.epoch = 0
        self.prefetch, self.num_threads = prefetch, num_threads
        self._placeholder: Optional[Tuple[np.ndarray, int]] = None
        self._placeholder_lock = threading.Lock()
        self._pipes = [self._build(num_threads, prefetch) for _ in range(num_pipelines)]
        self._repair_pipe = None  # runs a batch again after its bad files were replaced (built when needed)
        self.max_replacements = max_replacements
        self._sources: Dict[str, Source] = {}  # sample path -> what to read, from the manifest
        self._bad: Dict[str, str] = {}  # path read -> why it cannot be used
        if manifest is not None:
            self._sources = sources(dataset, manifest, use_prepared)
        self._threads = ThreadPoolExecutor(max_workers=num_threads)
        self._in_flight: Deque[Tuple[int, List[_Entry]]] = collections.deque()  # (pipeline, entries) scheduled

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """``start_batch``: skip this epoch's first batches (resuming a run where it stopped)."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _build(self, num_threads: int, prefetch: int):
        fn, types, pipeline_def = import_dali()
        gpu = self.device == "gpu"
        mean = [255 * m for m in OPENAI_DATASET_MEAN]
        std = [255 * s for s in OPENAI_DATASET_STD]

        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads,
                      device_id=torch.cuda.current_device() if gpu else None, prefetch_queue_depth=prefetch)
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
        self._start(p, prefetch)
        return p

    def _start(self, pipe, prefetch: int) -> None:
        """Run ``prefetch`` batches of placeholders through a new pipeline and drop them. DALI's first
        ``schedule_run`` fills the whole prefetch queue (it needs ``prefetch`` batches fed); after it,
        each call runs one batch, so the loader can feed and schedule batch by batch."""
        data, idx = self._placeholder_item()
        blank = _Entry(None, data, np.asarray(idx, dtype=np.int32), np.asarray([0.5, 0.5], dtype=np.float32),
                       np.int32(0), -1, PADDING, False, 0)
        for _ in range(prefetch):
            for name in ("enc", "idx", "pos", "mirror"):
                pipe.feed_input(name, [getattr(blank, name)] * self.batch_size)
        pipe.schedule_run()
        for _ in range(prefetch):
            pipe.outputs()

    def _read(self, index: int, rng: random.Random):
        """(path read, bytes, frame indices) of a sample, or a VideoDecodeError (remembered: a bad file
        is probed once, not once per epoch)."""
        source = self._sources.get(self.dataset.samples[index].path) or Source(self.dataset.samples[index].path)
        path = source.path
        if source.error:
            raise VideoDecodeError(path, source.error)
        if path in self._bad:
            raise VideoDecodeError(path, self._bad[path])
        try:
            probe = source.probe or cached_probe(path)
            check_codec(path, probe.codec, self.device == "gpu")
            if probe.rotation % 360:
                raise VideoDecodeError(path, f"rotation metadata ({probe.rotation} degrees), which DALI does not apply; "
                                             "use prepare's copies (upright) or VideoLoader")
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
        return path, data, sample_indices(probe.frames, self.num_frames, self.mode, rng)

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

    @staticmethod
    def _feed(pipe, entries: List[_Entry]) -> None:
        """Feed a batch and start DALI on it (asynchronously: the pipeline's ``outputs`` takes the result)."""
        for name in ("enc", "idx", "pos", "mirror"):
            pipe.feed_input(name, [getattr(e, name) for e in entries])
        pipe.schedule_run()

    def _outputs(self, pipe):
        """The oldest scheduled batch of ``pipe``. On the GPU it is bound to the caller's current CUDA
        stream, so the host does not wait for the decoding to finish (only to be scheduled)."""
        if self.device == "gpu":
            (out,) = pipe.outputs(cuda_stream=torch.cuda.current_stream())
        else:
            (out,) = pipe.outputs()
        return out

    def _decodes_alone(self, entry: _Entry) -> bool:
        try:
            decode_encoded(entry.enc, entry.idx, self.device == "gpu")
            return True
        except Exception:
            return False

    def _collect(self, pipe, batch: List[int], entries: List[_Entry]):
        """The output of ``pipe``'s oldest scheduled batch. A file that passed the probe but breaks DALI's
        decoder fails the whole batch: find it by decoding the batch's videos one at a time, mark it
        bad, redraw its entries (a replacement in training, an invalid placeholder in evaluation), and
        run the batch again on a pipeline of its own (the loader's pipelines have later batches queued)."""
        try:
            return self._outputs(pipe), entries
        except Exception as exc:  # DALI raises RuntimeError; the bad file is found below
            error = exc
        if self._repair_pipe is None:
            self._repair_pipe = self._build(self.num_threads, 1)
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
                self._feed(self._repair_pipe, entries)
                return self._outputs(self._repair_pipe), entries
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
        """DALI's output batch as a torch tensor of our own. On the GPU the copy is queued on the
        caller's current stream (the one DALI's outputs are bound to): no host wait. DALI writes fp32
        or fp16; bf16 (the training dtype) is one cast afterwards."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dali_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        out = out.as_tensor()
        if self.device == "cpu":
            video = torch.empty(out.shape(), dtype=dali_dtype)
            feed_ndarray(out, video)
            return video
        stream = torch.cuda.current_stream()
        video = torch.empty(out.shape(), dtype=dali_dtype, device="cuda")
        feed_ndarray(out, video, cuda_stream=stream)
        return video

    def _drain(self) -> None:
        """Take (and drop) the batches an epoch left early had queued, so the pipelines start empty."""
        while self._in_flight:
            pipe, _ = self._in_flight.popleft()
            try:
                self._outputs(self._pipes[pipe])
            except Exception:
                pass

    def __iter__(self):
        order = list(self.sampler)
        batches = [order[k : k + self.batch_size] for k in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        self._drain()
        depth = len(self._pipes) * self.prefetch  # batches decoding at once: each pipeline's queue full
        host_work: Dict[int, list] = {}  # batch number -> futures of its entries

        def start_host_work(k: int) -> None:
            if k < len(batches) and k not in host_work:
                host_work[k] = [self._threads.submit(self._entry, i) for i in batches[k]]

        scheduled = 0

        def schedule() -> None:
            """Keep every pipeline's queue full; the host work of the batch after runs meanwhile."""
            nonlocal scheduled
            while scheduled < len(batches) and len(self._in_flight) < depth:
                start_host_work(scheduled)
                entries = [f.result() for f in host_work.pop(scheduled)]
                pipe = scheduled % len(self._pipes)
                self._feed(self._pipes[pipe], entries)
                self._in_flight.append((pipe, entries))
                scheduled += 1
            start_host_work(scheduled)

        schedule()
        for k, batch in enumerate(batches):
            pipe, entries = self._in_flight.popleft()
            out, entries = self._collect(self._pipes[pipe], batch, entries)
            video = self._copy_out(out).to(self.dtype)
            valid = torch.tensor([e.valid for e in entries], dtype=torch.bool)
            self.stats["clips"] += int(valid.sum())
            self.stats["failures"] += sum(e.failures for e in entries)
            result = {"video": video, "label": torch.tensor([e.label for e in entries], dtype=torch.long),
                      "index": torch.tensor([e.index for e in entries], dtype=torch.long), "valid": valid}
            schedule()  # DALI decodes the next batches while the caller works on this one
            yield result
