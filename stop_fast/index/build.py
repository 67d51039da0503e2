"""``build_index``: encode a video library once into an index folder (``store.py``), resume a build
that was killed, and update an index when the library changes, encoding only what is new.

The algorithm, on rank 0 (under torchrun every rank encodes a share and rank 0 publishes):

1. Identity: each listed video is ``(absolute path, size, mtime_ns)`` (``sources.py``), sorted by path.
2. Known rows: the published index's rows, the rows of work shards that a killed build left in
   ``work/`` (written under the same fingerprint, else refused), and the failures both recorded;
   a row or failure counts only while its file's identity is unchanged.
3. To encode: the listed videos that no known row or failure covers. They are encoded in path order
   (``encode.py``), and every ``work_rows`` rows (whole batches) or ``work_seconds`` seconds this
   rank's rows and failures are written as one work shard, atomically: a kill loses at most one
   chunk, and the resumed build forms the same batches as an uninterrupted one would have.
4. Publish: the listed videos' rows (new from the work shards, others reused), in path order, are
   cut into shards at content-defined boundaries (after a path whose CRC-32 is 0 modulo
   ``shard_rows``, or after ``4 * shard_rows`` rows), so that adding or removing a video changes
   the one shard it falls in; a shard whose rows are exactly an old shard's is kept as it is, and
   the others are written under new names. Then ``index.json`` is replaced and what no manifest
   names is removed (``store.publish``). Removed videos drop out; their rows are not carried over.

The folder is held with ``RunLock`` (``.lock``) for the whole build; an index made with another
fingerprint (``provenance.py``) is refused naming the field.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import time
import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import store
from .provenance import check_same, config_from_record, describe, model_from_record
from .sources import VideoFile, stat_videos

SHARD_ROWS = 16384  # mean rows per published shard: 16 MiB at E = 512
WORK_ROWS = 1024  # rows per work shard (whole batches)
WORK_SECONDS = 60.0  # a work shard at least this often: a kill costs at most a minute of encoding
RUN_FIELDS = ("device", "precision", "impl", "compile", "decoder", "workers")  # how to run, never what runs
ADVICE = "an index holds the features of one model and one set of settings: choose another --out (or delete it)"


def build_index(out: str, videos: Sequence[str], config=None, checkpoint: Optional[str] = None, *,
                zero_shot: bool = False, keep: Iterable[str] = (), batch_size: int = 32, progress: bool = True,
                shard_rows: int = SHARD_ROWS, work_rows: int = WORK_ROWS, work_seconds: float = WORK_SECONDS,
                trust_torchscript: bool = False) -> Dict[str, Any]:
    """Index ``videos`` (paths; ``sources.videos_in_folder`` / ``videos_in_csv`` / ``videos_in_dataset``
    list them) into the folder ``out``, creating it, resuming it or updating it.

    The model: ``checkpoint`` (a run folder, ``.pt`` or prompt file; the run's settings are the
    caller's to merge into ``config``, as ``stop-fast index`` does) over ``config`` (a TrainConfig:
    backbone, weights, seed, evaluation frames and views, caption length; device, precision, impl,
    compile, decoder, workers); ``zero_shot=True``: the frozen CLIP ``config`` names, prompts off;
    neither: the model of the index already in ``out`` (``config`` then only says how to run it, and
    ``config.weights`` replaces a weights file that moved). ``keep``: settings the caller set
    explicitly (``model_from_checkpoint``). ``batch_size``: videos per batch on each rank.

    Returns (rank 0) ``{"index", "generation", "videos", "encoded", "reused", "removed", "failed",
    "shards", "encoded_now", "seconds"}``: rows in the index, rows new from work shards, rows reused
    from the index before, rows of videos gone or changed, the failure records, the number of
    shards, the videos this run decoded (this rank) and its encoding time."""
    from ..train import distributed
    from ..train.config import TrainConfig
    from ..train.lock import hold_run_folder
    from ..train.setup import resolve_device

    if not isinstance(out, str) or not out:
        raise ValueError(f"out must be a folder name, got {out!r}")
    if isinstance(videos, str) or not all(isinstance(v, str) for v in videos):
        raise ValueError("videos must be a list of video paths (sources.videos_in_folder lists a folder's)")
    if not videos:
        raise ValueError("videos: no video files to index")
    if checkpoint is not None and zero_shot:
        raise ValueError("checkpoint and zero_shot exclude each other")
    for name, value in (("batch_size", batch_size), ("shard_rows", shard_rows), ("work_rows", work_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(work_seconds, bool) or not isinstance(work_seconds, (int, float)) or not work_seconds > 0:
        raise ValueError(f"work_seconds must be a number > 0, got {work_seconds!r}")
    config = config or TrainConfig()
    info = distributed.setup(cuda=(config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"))
    try:
        device = resolve_device(config, info)
        _on_rank0(lambda: _claim_folder(out), info, device)
        with hold_run_folder(out, "index", info, device):
            model, config, prompts, source = _model(out, config, checkpoint, zero_shot, keep, device, info,
                                                    trust_torchscript)
            provenance = describe(model, config, prompts, source)
            if store.has_manifest(out):  # before a single video is decoded
                check_same(store.read_manifest(out)["provenance"]["fingerprint"], provenance["fingerprint"],
                           f"index {out}", ADVICE)
            plan = _on_rank0(lambda: _plan(out, videos, provenance), info, device)
            todo = _broadcast(plan.todo if plan else None, info)
            # unique per build: a resumed build in the same process and second must not overwrite the work
            # shards of the one it resumes
            run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}-r{info.rank}"
            written: List[str] = []

            def on_chunk(rows: store.Rows, failed: List[dict]) -> None:
                name = f"{run}-{len(written):06d}.safetensors"
                written.append(store.write_work_shard(out, name, rows, failed, provenance))

            stats = {"videos": 0, "seconds": 0.0}
            if todo:
                from .encode import encode_videos

                stats = encode_videos(model, config, todo, info, device, batch_size, on_chunk, work_rows,
                                      work_seconds, progress)
            distributed.any_rank(False, info, device)  # every rank's work shards are written
            result = _on_rank0(lambda: _publish(out, plan, provenance, model, prompts, shard_rows), info, device)
        return {**(result or {}), "encoded_now": stats["videos"], "seconds": round(stats["seconds"], 3)}
    finally:
        distributed.teardown()


def _on_rank0(step, info, device):
    """``step()`` on rank 0 (its result there, None elsewhere); when it fails every rank stops, rank 0
    with its own error, so that no rank waits for one that has left."""
    from ..train import distributed

    failure, result = None, None
    if info.main:
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank knows
            failure = exc
    if distributed.any_rank(failure is not None, info, device):
        raise failure or RuntimeError("index build: rank 0 failed (its error says why); this rank stops too")
    return result


def _claim_folder(out: str) -> None:
    """Create ``out``, or accept it when it is empty or an index (published or begun); anything else
    (a run folder, a dataset) is refused before a file is written into it."""
    os.makedirs(out, exist_ok=True)
    ours = {store.MANIFEST, store.PROMPTS, store.SHARDS_DIR, store.WORK_DIR, ".lock"}
    other = sorted(n for n in os.listdir(out) if n not in ours and not n.startswith("."))
    if other and not store.has_manifest(out):
        raise ValueError(f"{out} holds other files ({', '.join(other[:3])}) and no index; choose a new or empty "
                         "folder for the index")


def _model(out, config, checkpoint, zero_shot, keep, device, info, trust_torchscript):
    """``(model, config, prompt file or None, checkpoint for the record)`` of this build."""
    from ..train.checkpoint import resolve_prompts
    from ..train.setup import model_from_checkpoint

    cuda = device.type == "cuda"
    if checkpoint is None and not zero_shot:
        if not store.has_manifest(out):
            raise ValueError(f"{out} holds no index yet: name the model that makes it (--checkpoint RUN, or "
                             "--zero-shot; checkpoint= / zero_shot=True)")
        provenance = store.read_manifest(out)["provenance"]
        settings = {k: getattr(config, k) for k in RUN_FIELDS}
        record = config_from_record(provenance, weights=config.weights, **settings).resolved(cuda, info.local_rank)
        model, record = model_from_record(out, provenance, dataclasses.replace(record, device=str(device)), device)
        prompts = os.path.join(out, store.PROMPTS) if provenance["model"]["prompts"] else None
        return model, record, prompts, provenance["model"]["checkpoint"]
    config = dataclasses.replace(config.resolved(cuda, info.local_rank), device=str(device))
    prompts = resolve_prompts(checkpoint) if checkpoint else None
    if zero_shot:
        config = config.with_stop(k=0, rho=0)
    model, config = model_from_checkpoint(config, prompts, device, keep=keep, trust_torchscript=trust_torchscript)
    return model, config, prompts, checkpoint


@dataclasses.dataclass
class _Plan:
    files: List[VideoFile]  # what the index will hold (or name as failed), sorted by path
    missing: List[str]  # listed paths that are not files
    old: Optional[dict]  # the published manifest before this build
    todo: List[VideoFile]  # to encode


def _plan(out: str, videos: Sequence[str], provenance: dict) -> _Plan:
    files, missing = stat_videos(videos)
    old = store.read_manifest(out) if store.has_manifest(out) else None
    known = set()
    for shard in (old["shards"] if old else []):
        known.update(store.read_shard(os.path.join(out, shard["file"]), features=False)[0].keys())
    known.update(_failure_key(f) for f in (old["failed"] if old else []))
    for path in store.work_shards(out):
        rows, failed, made_by = store.read_work_shard(path)
        check_same(made_by["fingerprint"], provenance["fingerprint"], f"the unfinished build in {out}",
                   f"finish it with the model that began it, or delete {os.path.join(out, store.WORK_DIR)}")
        known.update(rows.keys())
        known.update(_failure_key(f) for f in failed)
    return _Plan(files, missing, old, [f for f in files if f.key not in known])


def _failure_key(record: dict) -> Tuple[str, Any, Any]:
    return (record["path"], record["size"], record["mtime_ns"])


def _broadcast(todo: Optional[List[VideoFile]], info) -> List[VideoFile]:
    """Rank 0's list of videos to encode, on every rank (all ranks shard one list)."""
    if not info.enabled:
        return todo
    import torch.distributed as dist

    box = [todo]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------- publish
def _publish(out: str, plan: _Plan, provenance: dict, model, prompts: Optional[str], shard_rows: int) -> Dict[str, Any]:
    """Merge the work shards into the listed videos' rows and publish them as the next index."""
    dim = model.visual.output_dim
    work_paths = store.work_shards(out)
    new_parts, failures = [], {}
    for f in (plan.old["failed"] if plan.old else []):
        failures[_failure_key(f)] = f
    for path in work_paths:
        rows, failed, _ = store.read_work_shard(path)
        new_parts.append(rows)
        failures.update((_failure_key(f), f) for f in failed)
    new = store.Rows.cat(new_parts, dim)
    new_at = {key: i for i, key in enumerate(new.keys())}
    old_at, old_rows = {}, {}
    for shard in (plan.old["shards"] if plan.old else []):
        keys = store.read_shard(os.path.join(out, shard["file"]), features=False)[0].keys()
        old_rows[shard["file"]] = len(keys)
        old_at.update((key, (shard["file"], r)) for r, key in enumerate(keys))

    kept: List[VideoFile] = []
    origins: List[Tuple[Optional[str], int]] = []  # (old shard or None for new rows, row in it)
    failed = [{"path": p, "size": None, "mtime_ns": None, "reason": "no such file"} for p in plan.missing]
    for f in plan.files:
        if f.key in new_at:
            kept.append(f)
            origins.append((None, new_at[f.key]))
        elif f.key in old_at:
            kept.append(f)
            origins.append(old_at[f.key])
        elif f.key in failures:
            failed.append(failures[f.key])
        else:  # cannot happen: every file to encode came back as a row or a failure
            raise RuntimeError(f"index build: {f.path} was neither encoded nor recorded as failed")

    cache: Dict[str, torch.Tensor] = {}

    def table(origin: Optional[str]) -> torch.Tensor:
        if origin is None:
            return new.features
        if origin not in cache:
            cache[origin] = store.read_shard(os.path.join(out, origin))[0].features
        return cache[origin]

    shards, start = [], 0
    for end in chunk_ends([f.path for f in kept], shard_rows):
        chunk = origins[start:end]
        name = chunk[0][0]
        if name is not None and old_rows.get(name) == len(chunk) and chunk == [(name, r) for r in range(len(chunk))]:
            shards.append({"file": name, "rows": len(chunk)})  # the same rows as before: kept as it is
        else:
            feats = torch.cat([table(o)[torch.tensor(rows)] for o, rows in _runs(chunk)])
            files = kept[start:end]
            rows = store.Rows([f.path for f in files], torch.tensor([f.size for f in files], dtype=torch.int64),
                              torch.tensor([f.mtime_ns for f in files], dtype=torch.int64), feats)
            shards.append({"file": store.write_shard(out, rows), "rows": len(chunk)})
        start = end
    if prompts and os.path.abspath(prompts) != os.path.abspath(os.path.join(out, store.PROMPTS)):
        from ..io import write_atomic

        with open(prompts, "rb") as f:
            write_atomic(os.path.join(out, store.PROMPTS), f.read())  # search needs nothing outside the index
    encoded = sum(o is None for o, _ in origins)
    old_total = plan.old["videos"] if plan.old else 0
    failed.sort(key=lambda f: f["path"])
    manifest = {
        "format": store.FORMAT,
        "generation": (plan.old["generation"] + 1) if plan.old else 1,
        "provenance": provenance,
        "embed_dim": dim,
        "shards": shards,
        "videos": len(kept),
        "failed": failed,
        "last_update": {"encoded": encoded, "reused": len(kept) - encoded, "removed": old_total - (len(kept) - encoded)},
    }
    store.publish(out, manifest, work_paths)
    return {"index": out, "generation": manifest["generation"], "videos": len(kept), **manifest["last_update"],
            "failed": failed, "shards": len(shards)}


def chunk_ends(paths: Sequence[str], target: int) -> List[int]:
    """Content-defined shard boundaries over sorted ``paths``: after each path whose CRC-32 is 0
    modulo ``target`` (a mean of ``target`` rows), or after ``4 * target`` rows without one. A path
    added or removed moves only the boundaries of the shard it falls in."""
    ends, start = [], 0
    for i, path in enumerate(paths):
        if zlib.crc32(path.encode("utf-8")) % target == 0 or i + 1 - start >= 4 * target:
            ends.append(i + 1)
            start = i + 1
    if start < len(paths):
        ends.append(len(paths))
    return ends


def _runs(origins: Sequence[Tuple[Optional[str], int]]) -> List[Tuple[Optional[str], List[int]]]:
    """Consecutive rows of one origin grouped: ``[(origin, [row, ...]), ...]``."""
    runs: List[Tuple[Optional[str], List[int]]] = []
    for origin, row in origins:
        if runs and runs[-1][0] == origin:
            runs[-1][1].append(row)
        else:
            runs.append((origin, [row]))
    return runs
