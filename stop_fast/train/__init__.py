"""Training and evaluation of STOP: both tasks of SPEC.md, one loop, torchrun, exact resume.

``from stop_fast.train import TrainConfig, train, evaluate``::

    config = load_config("hmdb51", video_root="/data/HMDB51", out="runs/hmdb51")
    result = train(config)          # {"val_top1": ..., "checkpoint": ".../prompts.safetensors", ...}
    evaluate(config, result["checkpoint"])

Rooms, one concern each: ``config`` (TrainConfig holding the model's STOPConfig, TOML, run records),
``setup`` (everything built from a config; ``model_from_checkpoint``), ``loop`` (the trainer),
``evaluation`` (evaluation over a loader), ``tasks`` (text features, losses), ``metrics`` (ranks and
their tie rule), ``optim`` (AdamW, warm-up + cosine), ``checkpoint`` (checkpoint files, resume, the
``--checkpoint`` rule), ``lock`` (a run owns its folder), ``signals`` (SIGTERM / SIGINT),
``distributed`` (torchrun), ``records`` (metrics.jsonl, TensorBoard, curves.png, train.log),
``inference`` (predict). See docs/TRAINING.md.

Names are imported on first use (PEP 562), so ``import stop_fast.train`` costs no torch import.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "config", "load_config": "config", "DATASETS": "config",
    "train": "loop", "evaluate": "evaluation", "model_from_checkpoint": "setup",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
