"""Search a video library by text: encode every video once into an index folder, then rank all of
them for any caption (or query video) in milliseconds.

``from stop_fast.index import build_index, videos_in_folder, VideoIndex``::

    from stop_fast.train.config import load_config, run_settings

    config = load_config(None, base=run_settings("runs/msrvtt"))  # the run's frames, views, backbone, weights
    build_index("lib.idx", videos_in_folder("/data/clips"), config, checkpoint="runs/msrvtt")
    build_index("lib.idx", videos_in_folder("/data/clips"))        # later: only new or changed files
    index = VideoIndex.open("lib.idx")        # the index alone (and the weights file it records)
    hits = index.search_text("a dog catches a ball", top=10)       # [Hit(path, score, row), ...]

Rooms, one concern each: ``store`` (the folder format: shards, manifest, publish, reading),
``provenance`` (what made an index: fingerprint, rebuilding its model), ``sources`` (which videos:
a folder, a CSV, a dataset; file identity), ``encode`` (the loader loop, work chunks, progress),
``build`` (resume, incremental update, torchrun, publish), ``search`` (exact top-K, VideoIndex).

Names are imported on first use (PEP 562), so ``import stop_fast.index`` costs no torch import.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "build_index": "build",
    "VideoIndex": "search", "Hit": "search", "top_k": "search",
    "videos_in_folder": "sources", "videos_in_csv": "sources", "videos_in_dataset": "sources",
    "IndexMismatchError": "provenance", "IndexFormatError": "store",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
