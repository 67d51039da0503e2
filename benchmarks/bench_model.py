"""Whole model: STOP's fast path against its reference and against the strongest baselines a user would write.

    python benchmarks/run.py --only model --out results.json
    python benchmarks/run.py --only 'model/ViT-B-32/*compiled*/train' --batch 32 --out results.json

Every variant encodes the same batch (B videos x T frames, random CLIP-normalised pixels, seed 2: no
clips are read; random backbone weights and non-zero prompters: speed does not depend on the values).
On CUDA in bf16: the frozen backbone cast once (``STOP.cast_backbone``) and the step run under bf16
autocast; on a CPU in fp32. Two modes:
- ``inference``: ``no_grad``, video -> (B, E) features;
- ``train``: a training step, forward + backward of ``(features * target).sum()`` into the trainable
  parameters (the frozen backbone gets no weight gradients); the optimiser's update is left out.
Variants:
- ``reference``: ``encode_video(impl="reference")``, eager (frames padded to 1 + N + rho, open_clip
  blocks with a float attention mask, conv1 and the Conv3d layers as convolutions);
- ``fast``: ``encode_video(impl="fast")``, eager (packed tokens, stop_fast's kernels);
- ``fast_compiled``: ``stop_fast.model.compiled.compile_encoder(model)``;
- ``fast_compiled_cudagraphs`` (inference): ``compile_encoder(model, static_shapes=True,
  mode="reduce-overhead")``: every frame padded to 1 + N + rho tokens, no host sync, CUDA graphs;
- ``openclip_compiled``: open_clip's ``encode_image`` as shipped, on all B*T frames, mean over
  frames, normalised, under ``torch.compile``: CLIP4Clip without prompts (N + 1 tokens a frame). It
  has no trainable parameters, so its training step back-propagates into the video: that adds conv1's
  input gradient and open_clip's layout transposes, work STOP's step never does;
- ``openclip_tuned_compiled``: the same open_clip model and weights as a user tuning it would run
  them, the strongest plain-CLIP baseline: conv1 as one GEMM of the patches (the fast path's own
  ``patch_embedding``; cuDNN's convolution took 2.2 ms plus 0.9 ms of transposes at ViT-B/32 on an
  H100, the GEMM ~0.2 ms), attention as SDPA on strided views of the fused QKV projection (no layout
  copies; SDPA's fastest backend, measured, see below), the last block for the CLS rows only (as the
  fast path's ``cls_block``: nothing else of it is used), the same compile mode. Its gradient enters
  where STOP's does, at the tokens after conv1: a learnable additive prompt on every token (a
  (1 + N, D) tensor folded into the positional embedding, zero so that the features are CLIP's), the
  training step's trainable parameter. That is the cheapest gradient entry any prompt method has: the
  backward runs through every block to the tokens (as STOP's does) and then sums over frames, with
  nothing into conv1 or the pixels and no prompt network; a baseline STOP's step must match;
- ``padded_sdpa_compiled``: STOP with every frame padded instead of packed, everything else the same:
  the fast path's steps 1-10 (same code), each frame's tokens padded to 1 + N + rho rows
  (``fast_forward(static_shapes=True)``'s layout), the transformer in SDPA with a boolean
  key-padding mask (SDPA's fastest backend for that mask, measured) and the CLS-only last block,
  compiled as one graph (no host sync is left) in the same compile mode: what packing saves over
  padding, at this commit;
- ``fast_torch_varlen_attn`` / ``fast_flex_attention``: the fast path, eager, with PyTorch's
  ``varlen_attn`` or FlexAttention with a document mask (built once per batch) in place of
  stop_fast's attention: the same model around a different attention (compare with ``fast``).
SDPA's backend for the two SDPA baselines is chosen per mode by timing one layer's attention (the
model's shapes, layout and mask; forward, or forward + backward for training) with each backend that
accepts it (flash, memory-efficient, cuDNN, math); the record names the choice and every backend's time.
All variants of one (model, mode) are timed interleaved in one process (``common.measure_interleaved``):
each record has ``ratios``, its time over every other variant's, median and p10 / p90 over rounds.
On CUDA, run.py turns on ``torch.backends.cudnn.benchmark`` for every variant (``--no-cudnn-benchmark``
keeps cuDNN's heuristics, under which open_clip's conv1 alone took 3.3 ms of a 12.4 ms ViT-B/32 step).
``--compile-mode max-autotune-no-cudagraphs`` compiles the fast path and every compiled baseline with
inductor's GEMM autotuning and epilogue fusion (minutes of compiling per case on a GPU).
Recorded per case: median / p10 / p90 ms, videos/s, tokens per frame measured on the timed batch,
FLOPs from those token counts, TFLOP/s and MFU against the matmul measured in the same run and (on a
GPU) against the data-sheet peak, peak memory, for compiled variants the compile time (the first
call, which compiles, minus one steady-state step) and the graph count and graph breaks, and the
inputs (``input``, ``clips``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import FlexDocumentAttention, require_torch_varlen, torch_varlen_attention  # noqa: E402
from common import (Case, CaseGroup, Unavailable, first_call_s, measure, run_group, training_flops,  # noqa: E402
                    vit_flops)
from profile_kernels import format_breakdown, kernel_breakdown  # noqa: E402

MODELS = ("ViT-B-32", "ViT-B-16")
QUICK_MODELS = ("stop-tiny", "ViT-B-32")
COMPILED = {"fast_compiled", "fast_compiled_cudagraphs", "openclip_compiled", "openclip_tuned_compiled",
            "padded_sdpa_compiled"}
# The quick run (minutes on 2 CPU cores): the eager paths of both models, every compiled variant that
# runs on a CPU for the smallest model only.
QUICK_CASES = {(name, variant, mode) for name in QUICK_MODELS for variant in ("reference", "fast")
               for mode in ("inference", "train")} | {
    ("stop-tiny", variant, mode) for variant in ("fast_compiled", "openclip_compiled", "openclip_tuned_compiled",
                                                 "padded_sdpa_compiled") for mode in ("inference", "train")}
VARIANTS = ("reference", "fast", "fast_compiled", "fast_compiled_cudagraphs", "openclip_compiled",
            "openclip_tuned_compiled", "padded_sdpa_compiled", "fast_torch_varlen_attn", "fast_flex_attention")
# Under a time budget (lower first): the eager paths of both backbones, the compiled fast path and
# the strongest plain CLIP (issue 17's targets compare the two), the other baselines' inference,
# attention swaps, then what compiles longest; ViT-B/16 after B/32.
PRIORITY = {"reference": 0, "fast": 0, "fast_compiled": 2, "openclip_tuned_compiled": 2, "openclip_compiled": 3,
            "padded_sdpa_compiled": 3, "fast_compiled_cudagraphs": 4, "fast_torch_varlen_attn": 4,
            "fast_flex_attention": 4}
BASELINES = ("openclip_compiled", "openclip_tuned_compiled", "padded_sdpa_compiled")
# plain CLIP: 1 + N tokens a frame, no prompts
CLIP_VARIANTS = {"openclip_compiled", "openclip_tuned_compiled"}
# variants whose attention is SDPA with the backend chosen by timing
SDPA_VARIANTS = {"openclip_tuned_compiled", "padded_sdpa_compiled"}
# variants measured for inference only: CUDA graphs need the static-shape mode, an inference option
INFERENCE_ONLY = {"fast_compiled_cudagraphs"}
MODES = ("inference", "train")
CPU_SKIPS = {
    "fast_compiled_cudagraphs": "CUDA graphs: CUDA only",
    "fast_torch_varlen_attn": "varlen_attn runs flash attention kernels: CUDA only",
    "fast_flex_attention": "FlexAttention compiles a CPU kernel for minutes; run it on a GPU",
}
INPUT = "random CLIP-normalised pixels (torch.Generator seed 2); no clips read"


def priority(name: str, variant: str, mode: str) -> int:
    """Cases run in this order under a time budget (lower first), see PRIORITY."""
    p = PRIORITY[variant] + (3 if variant in BASELINES and mode == "train" else 0)
    if name == "ViT-B-16":
        p += 1 if p == 0 else 3
    return p


# --------------------------------------------------------------------------- models and inputs
def backbone(ctx, name: str):
    """The frozen open_clip model (random weights), built once per run and shared by every STOP."""
    key = ("clip", name)
    if key not in ctx.cache:
        import stop_fast

        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "random weights" is what we want here
            clip = stop_fast.load_clip(name, device=ctx.device)
        ctx.cache[key] = clip
    return ctx.cache[key]


def stop_model(ctx, name: str, frames: int, rho: int = 12):
    """STOP over the shared backbone, prompters filled with small random values (as after training),
    the backbone resident in bf16 on CUDA."""
    key = ("stop", name, frames, rho)
    if key not in ctx.cache:
        import stop_fast

        clip = backbone(ctx, name)
        torch.manual_seed(1)
        model = stop_fast.STOP(stop_fast.STOPConfig(model_name=name, num_frames=frames, rho=rho), clip).to(ctx.device)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.normal_(0, 0.02)
        if ctx.bf16:
            model.cast_backbone(torch.bfloat16)
        ctx.cache[key] = model
    return ctx.cache[key]


def amp(ctx):
    return torch.autocast("cuda", dtype=torch.bfloat16) if ctx.bf16 else contextlib.nullcontext()


class Setup:
    """One (backbone, B, T, rho) point: the model, the timed batch, its token counts and FLOPs, and
    what its variants build once (compiled encoders, the tuned baseline's prompt, SDPA backends)."""

    def __init__(self, ctx, name: str, batch: int, frames: int, rho: int = 12):
        self.ctx, self.name, self.batch, self.frames = ctx, name, batch, frames
        self.model = stop_model(ctx, name, frames, rho)
        size = self.model.image_size
        g = torch.Generator().manual_seed(2)
        self.video = torch.randn(batch, frames, 3, size, size, generator=g).to(ctx.device)
        self.target = torch.randn(batch, self.model.clip.visual.output_dim, generator=g).to(ctx.device)
        with amp(ctx):
            counts = explain_counts(self.model, self.video)
        self.counts = counts.flatten().cpu()
        n = self.model.num_patches
        self.stop_lengths = 1 + n + self.counts
        self.clip_lengths = torch.full_like(self.counts, 1 + n)
        visual = self.model.visual
        self.stop_flops = vit_flops(visual, self.stop_lengths, self.counts.numel())
        self.clip_flops = vit_flops(visual, self.clip_lengths, self.counts.numel())
        self.compiled: Dict[str, Callable] = {}
        # openclip_tuned_compiled's trainable parameter: an additive prompt on every token, zero
        self.clip_prompt = torch.zeros(1 + n, visual.conv1.out_channels, device=ctx.device, requires_grad=True)
        self.sdpa: Dict[Tuple[str, str], Dict[str, Any]] = {}  # (variant, mode) -> chosen backend and timings
        self.reference_features: Optional[torch.Tensor] = None
        self.openclip_features: Optional[torch.Tensor] = None

    def tokens(self, variant: str) -> Dict[str, Any]:
        lengths = self.clip_lengths if variant in CLIP_VARIANTS else self.stop_lengths
        padded = variant in ("reference", "padded_sdpa_compiled", "fast_compiled_cudagraphs")
        longest = 1 + self.model.num_patches + self.model.config.rho
        record = {"mean_per_frame": float(lengths.float().mean()), "total": int(lengths.sum()),
                  "computed_per_frame": longest if padded else float(lengths.float().mean()),
                  "layout": "padded" if padded else "packed"}
        if variant == "fast_compiled":  # compile_encoder pads the packed rows to a bucket
            from stop_fast.model.fast import bucket_rows

            record["computed_per_frame"] = bucket_rows(record["total"], longest, lengths.numel()) / lengths.numel()
            record["layout"] = "packed, padded to a bucket"
        return record


def explain_counts(model, video) -> torch.Tensor:
    """n_t of every frame of this batch, as the fast path computes them."""
    return model.explain(video, impl="fast")["counts"]


# --------------------------------------------------------------------------- SDPA blocks and backends
def sdpa_attention_block(block, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One frozen open_clip block on (F, L, D) frames with SDPA: q, k, v are strided views of the fused
    QKV projection (no layout copies); ``keep`` (F, 1, 1, L) bool masks padded keys."""
    f, length, width = x.shape
    heads = block.attn.num_heads
    qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.view(f, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(f, length, width)
    x = x + block.ls_1(block.attn.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def sdpa_cls_block(block, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The last block for the CLS rows only, (F, L, D) -> (F, D): keys and values from every token,
    the query, attention output, out-projection and MLP from the CLS row (the rest is never used)."""
    f, length, width = x.shape
    heads = block.attn.num_heads
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    h = block.ln_1(x)
    k, v = F.linear(h, w[width:], b[width:]).view(f, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
    q = F.linear(h[:, 0], w[:width], b[:width]).view(f, heads, 1, width // heads)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).reshape(f, width)
    x_cls = x[:, 0] + block.ls_1(block.attn.out_proj(o))
    return x_cls + block.ls_2(block.mlp(block.ln_2(x_cls)))


def sdpa_transformer(visual, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``ln_pre`` and every block on (F, L, D) tokens, the last for the CLS rows only: CLS (F, D)."""
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = sdpa_attention_block(block, x, keep)
    return sdpa_cls_block(blocks[-1], x, keep)


def sdpa_backends() -> Dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def fastest_sdpa_backend(ctx, frames: int, heads: int, length: int, head_dim: int, lengths: Optional[torch.Tensor],
                         train: bool) -> Dict[str, Any]:
    """SDPA's fastest backend for one layer of the model: (frames, heads, length, head_dim) q, k, v as
    strided views of a fused QKV tensor (the blocks' layout), the key-padding mask of ``lengths``
    (None: no mask), in the model's dtype; forward, or forward + backward when ``train``. Every
    backend that accepts the input is timed; ``{"backend": name, "ms": {name: ms or why not}}``."""
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16 if ctx.bf16 else torch.float32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(frames, length, 3, heads, head_dim, generator=g).to(ctx.device, dtype).requires_grad_(train)
    grad = torch.randn(frames, heads, length, head_dim, generator=g).to(ctx.device, dtype)
    keep = None
    if lengths is not None:
        keep = (torch.arange(length)[None, :] < lengths[:, None]).to(ctx.device)[:, None, None, :]

    def attend():
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        if train:
            qkv.grad = None
            o.backward(grad)

    timings: Dict[str, Any] = {}
    for name, backend in sdpa_backends().items():
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings(), torch.set_grad_enabled(train):
                warnings.simplefilter("ignore")  # each refusing backend warns why; the record says so
                timings[name] = measure(attend, ctx.device, warmup=2, min_reps=5, target_s=0.2)["median_ms"]
        except RuntimeError as exc:
            timings[name] = f"not available: {str(exc).splitlines()[0][:160]}"
    available = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
    if not available:
        raise Unavailable(f"no SDPA backend runs this attention: {timings}")
    return {"backend": min(available, key=available.get), "ms": timings}


def sdpa_choice(setup: Setup, variant: str, mode: str) -> Dict[str, Any]:
    """The fastest SDPA backend for ``variant``'s attention in ``mode`` (measured once per setup)."""
    key = (variant, mode)
    if key not in setup.sdpa:
        visual = setup.model.visual
        heads = visual.transformer.resblocks[0].attn.num_heads
        head_dim = visual.conv1.out_channels // heads
        frames = setup.counts.numel()
        if variant == "padded_sdpa_compiled":
            longest = 1 + setup.model.num_patches + setup.model.config.rho
            setup.sdpa[key] = fastest_sdpa_backend(setup.ctx, frames, heads, longest, head_dim, setup.stop_lengths,
                                                   mode == "train")
        else:
            setup.sdpa[key] = fastest_sdpa_backend(setup.ctx, frames, heads, 1 + setup.model.num_patches, head_dim,
                                                   None, mode == "train")
    return setup.sdpa[key]


# --------------------------------------------------------------------------- the variants
def tuned_clip_features(visual, prompt: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """open_clip's image tower on every frame, as a user tuning it runs it (see the module docstring),
    with ``prompt`` (1 + N, D) added to every frame's tokens; mean over frames, normalised: (B, E)."""
    from stop_fast.model.steps import patch_embedding

    b, t = video.shape[:2]
    x = patch_embedding(visual.conv1, video.flatten(0, 1))  # (F, N, D): conv1 as one GEMM
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + (visual.positional_embedding + prompt).to(x.dtype)
    pooled = visual.ln_post(sdpa_transformer(visual, x)) @ visual.proj.to(x.dtype)
    return F.normalize(pooled.float().unflatten(0, (b, t)).mean(dim=1), dim=-1)


def padded_sdpa_encode(model, x: torch.Tensor, cu_seqlens, max_seqlen, starts, lengths, attention=None) -> torch.Tensor:
    """``fast_forward``'s encode stage for its static (padded) layout, in SDPA: ``x`` (F L, D), frame f
    valid on its first ``lengths[f]`` rows -> per-frame features (F, E)."""
    from stop_fast.model.steps import frame_features

    frames = lengths.shape[0]
    x = x.view(frames, -1, x.shape[-1])
    keep = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[:, None, None, :]
    return frame_features(model.visual, sdpa_transformer(model.visual, x, keep))


def encoder(setup: Setup, variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """video -> (B, E) features for ``variant`` (compiled ones built once per setup, shared by modes)."""
    model = setup.model
    if variant in ("reference", "fast"):
        return lambda video: model.encode_video(video, impl=variant, check_inputs=False)
    if variant in ("fast_torch_varlen_attn", "fast_flex_attention"):
        from stop_fast.model.fast import fast_forward
        from stop_fast.model.steps import video_feature

        if variant == "fast_torch_varlen_attn":
            require_torch_varlen()
            attention = torch_varlen_attention
        else:
            attention = FlexDocumentAttention(reuse_per_batch=True)
        return lambda video: video_feature(fast_forward(model, video, attention=attention))
    if variant not in setup.compiled:
        setup.compiled[variant] = build_compiled(setup, variant, setup.ctx.compile_mode)
    return setup.compiled[variant]


def build_compiled(setup: Setup, variant: str, mode: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mode``: ``torch.compile``'s mode for the fast path and every compiled baseline alike (a fair
    comparison compiles them the same way); the CUDA-graphs variant keeps "reduce-overhead"."""
    from stop_fast.model.compiled import compile_encoder

    model = setup.model
    options = {"mode": mode} if mode else {}
    if variant == "fast_compiled":
        return compile_encoder(model, impl="fast", **options)
    if variant == "fast_compiled_cudagraphs":
        return compile_encoder(model, impl="fast", static_shapes=True, mode="reduce-overhead")
    if variant == "openclip_compiled":
        clip = model.clip

        def plain_clip(video):
            b, t = video.shape[:2]
            feats = clip.encode_image(video.flatten(0, 1)).float().unflatten(0, (b, t))
            return F.normalize(feats.mean(dim=1), dim=-1)

        return torch.compile(plain_clip, **options)
    if variant == "openclip_tuned_compiled":
        visual, prompt = model.visual, setup.clip_prompt
        compiled = torch.compile(tuned_clip_features, **options)
        return lambda video: compiled(visual, prompt, video)
    if variant == "padded_sdpa_compiled":
        from stop_fast.model.fast import fast_forward
        from stop_fast.model.steps import video_feature

        def padded(video):
            return video_feature(fast_forward(model, video, static_shapes=True, encode=padded_sdpa_encode))

        compiled = torch.compile(padded, **options)
        return lambda video: compiled(video.to(model.backbone_dtype))  # as encode_video casts it
    raise ValueError(f"unknown variant {variant!r}")


def step_function(setup: Setup, variant: str, mode: str) -> Callable[[], Any]:
    """One inference or training step of ``variant`` on the setup's batch (see the module docstring);
    the SDPA variants run under their measured fastest backend (compiled graphs fix it when traced)."""
    ctx, encode = setup.ctx, encoder(setup, variant)
    backend = contextlib.nullcontext
    if variant in SDPA_VARIANTS:
        from torch.nn.attention import sdpa_kernel

        chosen = sdpa_backends()[sdpa_choice(setup, variant, mode)["backend"]]
        backend = lambda: sdpa_kernel([chosen])  # noqa: E731
    if mode == "inference":
        def infer():
            with torch.no_grad(), amp(ctx), backend():
                return encode(setup.video)
        return infer
    video = setup.video
    if variant == "openclip_compiled":  # no trainable parameters: the gradient goes into the video
        video = setup.video.clone().requires_grad_()
        params = [video]
    elif variant == "openclip_tuned_compiled":
        params = [setup.clip_prompt]
    else:
        params = list(setup.model.trainable_parameters())

    def train():
        for p in params:
            p.grad = None
        with amp(ctx), backend():
            feats = encode(video)
        (feats.float() * setup.target).sum().backward()
    train.params = params  # what the step's gradient reaches (for tests)
    return train


# --------------------------------------------------------------------------- one group of variants
def run_variants(ctx, setup_fn: Callable[[], Setup], variants: List[str], mode: str, group: str,
                 timing: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Measure ``variants`` at one (model, B, T, rho) point in ``mode``, interleaved: {variant: record}."""
    setup = setup_fn()

    def build(variant: str):
        if ctx.device.type == "cpu" and variant in CPU_SKIPS:
            return {"skipped": CPU_SKIPS[variant]}
        record: Dict[str, Any] = {"model": setup.name, "variant": variant, "mode": mode, "batch": setup.batch,
                                  "frames": setup.frames, "rho": setup.model.config.rho,
                                  "precision": "bf16 autocast, backbone cast to bf16" if ctx.bf16 else "fp32",
                                  "tokens": setup.tokens(variant), "input": INPUT, "clips": []}
        if variant in SDPA_VARIANTS:
            choice = sdpa_choice(setup, variant, mode)
            record.update(sdpa_backend=choice["backend"], sdpa_backends_ms=choice["ms"])
        fn = step_function(setup, variant, mode)
        if variant in COMPILED:
            record.update(compile_first_call(fn, ctx.device))
        return fn, lambda timing: finish(ctx, setup, variant, mode, fn, record, timing)

    return run_group(group, variants, build, ctx.device, timing or ctx.timing)


def finish(ctx, setup: Setup, variant: str, mode: str, fn: Callable[[], Any], record: Dict[str, Any],
           timing: Dict[str, Any]) -> Dict[str, Any]:
    """The record of a timed variant: its timing, throughput, FLOPs, MFU, profile, agreement."""
    record.update(timing)
    if ctx.profile:
        record["profile"] = kernel_breakdown(fn, ctx.device)
        print(format_breakdown(f"model/{setup.name}/{variant}/{mode}", record["profile"]), flush=True)
    if "first_call_s" in record:
        record["compile_s"] = max(record["first_call_s"] - timing["median_ms"] / 1e3, 0.0)
    seconds = timing["median_ms"] / 1e3
    record["videos_per_s"] = setup.batch / seconds
    flops = setup.clip_flops if variant in CLIP_VARIANTS else setup.stop_flops
    # only the as-shipped open_clip step back-propagates into the pixels (conv1's input gradient)
    total = flops["forward"] if mode == "inference" else training_flops(flops, input_grad=variant == "openclip_compiled")
    record["flops"] = total
    record["flops_note"] = "useful work on the real (unpadded) tokens; padded variants compute more"
    record["tflops"] = total / seconds / 1e12
    if ctx.compute_ceiling:
        record["mfu_vs_measured_matmul"] = record["tflops"] / ctx.compute_ceiling
    if ctx.ceilings.get("datasheet_bf16_tflops") and ctx.bf16:
        record["mfu_vs_datasheet"] = record["tflops"] / ctx.ceilings["datasheet_bf16_tflops"]
    if mode == "inference" and variant == "openclip_tuned_compiled":
        record.update(openclip_agreement(setup, fn))
    elif mode == "inference" and variant not in ("reference", "openclip_compiled"):
        record.update(agreement(setup, fn))
    return record


def compile_first_call(fn, device) -> Dict[str, Any]:
    """Run the first (compiling) call; its time, the dynamo graph count and breaks, compile warnings."""
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seconds = first_call_s(fn, device)
    counters = torch._dynamo.utils.counters
    out = {"first_call_s": seconds,
           "graphs": int(counters["stats"].get("unique_graphs", 0)),
           "graph_breaks": int(sum(counters["graph_break"].values()))}
    notes = sorted({str(w.message).splitlines()[0][:300] for w in caught if "compil" in str(w.message).lower()})
    if notes:
        out["compile_warnings"] = notes
    return out


def agreement(setup: Setup, infer) -> Dict[str, Any]:
    """Largest |difference| of this variant's features from the reference path's, same batch and
    precision: a fast variant that computes something else is not a speed-up."""
    if setup.reference_features is None:
        with torch.no_grad(), amp(setup.ctx):
            setup.reference_features = setup.model.encode_video(setup.video, impl="reference", check_inputs=False).float()
    with torch.no_grad():
        out = infer().float()
    return {"max_abs_diff_vs_reference": float((out - setup.reference_features).abs().max())}


def openclip_agreement(setup: Setup, infer) -> Dict[str, Any]:
    """The tuned baseline (its prompt zero) against open_clip's own ``encode_image``, eager, same batch
    and precision: a rewrite that computes something else is no baseline."""
    if setup.openclip_features is None:
        b, t = setup.video.shape[:2]
        with torch.no_grad(), amp(setup.ctx):
            feats = setup.model.clip.encode_image(setup.video.flatten(0, 1)).float().unflatten(0, (b, t))
        setup.openclip_features = F.normalize(feats.mean(dim=1), dim=-1)
    with torch.no_grad():
        out = infer().float()
    return {"max_abs_diff_vs_openclip": float((out - setup.openclip_features).abs().max())}


# --------------------------------------------------------------------------- cases for run.py
def cases(ctx) -> List[CaseGroup]:
    """One interleaved group per (model, mode): every variant of it a member."""
    out = []
    for name in (QUICK_MODELS if ctx.quick else MODELS):
        batch = ctx.quick_batch(name) if ctx.quick else ctx.batch

        def setup_fn(name=name, batch=batch) -> Setup:
            return ctx.current_setup(Setup, name, batch, ctx.frames, 12)

        for mode in MODES:
            members = {}
            for variant in VARIANTS:
                if variant in COMPILED and ctx.device.type == "cpu" and not ctx.compile_on_cpu:
                    continue
                if variant in INFERENCE_ONLY and mode != "inference":
                    continue
                if ctx.quick and (name, variant, mode) not in QUICK_CASES:
                    continue
                if variant in COMPILED:
                    estimate = lambda variant=variant, mode=mode: ctx.compile_estimate(variant, mode)  # noqa: E731
                else:
                    estimate = 30 if "flex" in variant else 10
                members[variant] = Case(f"model/{name}/{variant}/{mode}", None, estimate_s=estimate,
                                        priority=priority(name, variant, mode))
            group = f"model/{name}/{mode}"
            out.append(CaseGroup(group, members, lambda variants, setup_fn=setup_fn, mode=mode, group=group:
                                 run_variants(ctx, setup_fn, variants, mode, group)))
    return out
