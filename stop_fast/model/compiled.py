"""``compile_encoder``: a STOP video encoder run under ``torch.compile``, falling back to eager.

Eager PyTorch runs LayerNorm, QuickGELU (three element-wise passes), residual adds and autocast's
casts as separate memory-bound kernels around every GEMM of the frozen blocks; ``torch.compile``
fuses them (the Triton kernels are ``torch.library`` custom ops with fake implementations and
registered autograd, so they trace).

The fast path compiles as two graphs around its one host synchronisation (the packed token count):
the prompt stage (steps 1-10, shapes fixed by B and T) and the encode stage (steps 11-12), whose
packed rows are padded to a bucket (``fast.bucket_rows``: a multiple of up to 8 frames' worth of
rows: at most ~2.5% more rows from 48 frames up, less than one frame's worth below) and compiled
with static shapes, one graph per bucket.
Measured on an H100 (ViT-B/32, B = 32, T = 12, bf16): the single graph with the count as an unbacked
(data-dependent) size ran its inductor kernels ~2x slower than static shapes (5.5 ms against 2.7 ms
per step) and left the GPU idle ~2 ms. A new bucket or batch shape compiles once (tens of seconds
on a GPU); a training run meets a handful.

Usage::

    encode = compile_encoder(model, impl="fast")           # any torch.compile keyword: mode=, backend=, ...
    with torch.autocast("cuda", dtype=torch.bfloat16):
        features = encode(video)                            # (B, E), as model.encode_video(video, impl)

Plain ``model.encode_video`` never compiles anything.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..config import IMPLS
from .steps import video_feature

if TYPE_CHECKING:  # pragma: no cover
    from .stop import STOP


# Graphs dynamo keeps per compiled function, shared by every encoder of the process: the encode stage
# needs one per (batch shape, bucket of packed rows, grad mode), a few per batch shape.
RECOMPILE_LIMIT = 64


def _compiler_config():
    import torch._dynamo

    # boolean-mask sizes (PyTorch fallbacks, the reference path) are data-dependent
    patch = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            patch[name] = max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT)
            break
    return torch._dynamo.config.patch(**patch)


class CompiledEncoder:
    """``video -> (B, E)`` features through ``torch.compile``; eager after the first compile failure.

    Attributes: ``model``, ``impl``, ``compiled`` (False once it fell back to eager) and
    ``fallback_reason`` (the failure, as one line). Inputs are checked in eager mode (shapes, dtype,
    device, like ``encode_video(..., check_inputs=False)``), so a user's mistake raises the usual
    ``ValueError`` and never counts as a compile failure.
    """

    def __init__(self, model: "STOP", impl: str = "fast", static_shapes: bool = False, **compile_kwargs):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if not isinstance(static_shapes, bool):
            raise ValueError(f"static_shapes must be a bool, got {static_shapes!r}")
        self.model = model
        self.impl = impl
        self.static_shapes = static_shapes
        self.compiled = True
        self.fallback_reason = None
        self._succeeded = False
        self._warned_recompile_limit = False
        self.staged = impl == "fast" and not static_shapes
        try:
            if self.staged:
                from .fast import encode_packed, prompt_frames

                self._prompt = torch.compile(prompt_frames, **compile_kwargs)
                self._encode = torch.compile(encode_packed, **{"dynamic": False, **compile_kwargs})
                self._compiled_fn = self._staged_features
            else:
                self._compiled_fn = torch.compile(self._features, **compile_kwargs)
        except Exception as exc:  # e.g. an unknown backend or mode
            self._fall_back(exc)

    def _features(self, video: torch.Tensor) -> torch.Tensor:
        return video_feature(self.model.forward_frames(video, self.impl, static_shapes=self.static_shapes))

    def _staged_features(self, video: torch.Tensor) -> torch.Tensor:
        from .fast import fast_forward

        return video_feature(fast_forward(self.model, video, prompt=self._prompt, encode=self._encode, bucket=True))

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        video, _, _ = self.model.prepare_inputs(video, self.impl, check_values=False)
        if self.compiled:
            try:
                with _compiler_config():
                    out = self._compiled_fn(video)
                self._succeeded = True
                return out
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                if _is_recompile_limit(exc):  # fullgraph=True past the limit: this shape runs eagerly
                    self._warn_recompile_limit(exc)
                    return self._features(video)
                # Before the first success any failure is the compiler's (the inputs were checked);
                # later only compiler errors are (a recompilation for a new shape), others propagate.
                if self._succeeded and not _is_compiler_error(exc):
                    raise
                self._fall_back(exc)
        return self._features(video)

    def _warn_recompile_limit(self, exc: BaseException) -> None:
        if not self._warned_recompile_limit:
            self._warned_recompile_limit = True
            warnings.warn(
                f"compile_encoder: dynamo's recompile limit was reached ({_one_line(exc)}); shapes that "
                "were not compiled yet run eagerly, compiled ones stay compiled",
                RuntimeWarning,
                stacklevel=3,
            )

    def _fall_back(self, exc: BaseException) -> None:
        self.compiled = False
        self.fallback_reason = _one_line(exc)
        warnings.warn(
            f"compile_encoder: torch.compile failed ({self.fallback_reason}); running the {self.impl} path eagerly",
            RuntimeWarning,
            stacklevel=3,
        )


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of the exception and of its root cause (compiler errors wrap the real one)."""
    def describe(e):
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__

    root = exc
    for _ in range(10):  # BackendCompilerFailed keeps the backend's error as `inner_exception`
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if not isinstance(inner, BaseException) or inner is root:
            break
        root = inner
    return describe(exc) if root is exc else f"{describe(exc)} ... {describe(root)}"


def _is_recompile_limit(exc: BaseException) -> bool:
    """dynamo refused to compile one more graph for this code (``fullgraph=True`` raises; without it
    dynamo runs the new shape eagerly itself). The graphs compiled so far are still good."""
    import torch._dynamo.exc

    limit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None) or getattr(
        torch._dynamo.exc, "FailOnCacheLimitHit", None)
    return limit is not None and isinstance(exc, limit)


def _is_compiler_error(exc: BaseException) -> bool:
    import torch._dynamo.exc

    if isinstance(exc, torch._dynamo.exc.TorchDynamoException):
        return True
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton"))


def compile_encoder(model: "STOP", impl: str = "fast", static_shapes: bool = False, **compile_kwargs) -> CompiledEncoder:
    """A callable ``video -> (B, E)`` L2-normalised features, ``model.encode_video(video, impl,
    check_inputs=False)`` run under ``torch.compile(**compile_kwargs)``.

    If compiling fails (at ``torch.compile`` or when the first call traces and compiles), it warns
    once, naming the reason, and runs eagerly from then on. Gradients flow to the trainable parts as
    in eager mode. New input shapes recompile (``torch.compile``'s own rules, e.g. ``dynamic=``); the
    fast path compiles as two graphs around its host sync, the second once per bucket of packed rows
    (``dynamic=False`` unless given; see the module docstring).

    ``static_shapes=True`` (fast path, for inference) pads every frame to 1 + N + rho tokens so that
    no shape depends on the data and no host sync remains: the same features (up to rounding), ~11%
    more tokens at ViT-B/32 with rho = 12, and CUDA graphs become possible (``mode="reduce-overhead"``).
    """
    return CompiledEncoder(model, impl, static_shapes, **compile_kwargs)
