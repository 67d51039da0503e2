"""Whole model: STOP's fast path against its reference and against the baselines a user would write.

    python benchmarks/run.py --only model --out results.json
    python benchmarks/run.py --only model/ViT-B-32/fast_compiled --batch 32 --out results.json

Every variant encodes the same batch (B videos x T frames, random CLIP-normalised pixels; random
backbone weights and non-zero prompters: speed does not depend on the values). On CUDA in bf16: the
frozen backbone cast once (``STOP.cast_backbone``) and the step run under bf16 autocast; on a CPU in
fp32. Two modes:
- ``inference``: ``no_grad``, video -> (B, E) features;
- ``train``: a training step, forward + backward of ``(features * target).sum()`` into the trainable
  prompters (the frozen backbone gets no weight gradients); the optimiser's update is left out.
Variants:
- ``reference``: ``encode_video(impl="reference")``, eager (frames padded to 1 + N + rho, open_clip
  blocks with a float attention mask);
- ``fast``: ``encode_video(impl="fast")``, eager (packed tokens, stop_fast's kernels);
- ``fast_compiled``: ``stop_fast.model.compiled.compile_encoder(model)``;
- ``fast_compiled_cudagraphs`` (inference): ``compile_encoder(model, static_shapes=True,
  mode="reduce-overhead")``: every frame padded to 1 + N + rho tokens, no host sync, CUDA graphs;
- ``openclip_compiled``: plain open_clip ``encode_image`` on all B*T frames, mean over frames,
  normalised, under ``torch.compile``: CLIP4Clip without prompts, STOP's ceiling (N + 1 tokens a
  frame). Its training step back-propagates into the video (it has no prompts to train), which adds
  the patch embedding's backward (~1% of the step);
- ``padded_sdpa_compiled``: the reference path with its transformer written the way a user would with
  SDPA (a broadcast boolean key-padding mask), compiled like the fast path (``compile_encoder``);
- ``fast_torch_varlen_attn`` / ``fast_flex_attention``: the fast path, eager, with PyTorch's
  ``varlen_attn`` or FlexAttention with a document mask (built once per batch) in place of
  stop_fast's attention: the same model around a different attention (compare with ``fast``).
On CUDA, run.py turns on ``torch.backends.cudnn.benchmark`` for every variant (``--no-cudnn-benchmark``
keeps cuDNN's heuristics, under which open_clip's conv1 alone took 3.3 ms of a 12.4 ms ViT-B/32 step);
the fast path computes conv1 and its Conv3d layers as GEMMs and does not depend on it.
``--compile-mode max-autotune-no-cudagraphs`` compiles the fast path and both compiled baselines with
inductor's GEMM autotuning and epilogue fusion (minutes of compiling per case on a GPU).
Recorded per case: median / p10 / p90 ms, videos/s, tokens per frame measured on the timed batch,
FLOPs from those token counts, TFLOP/s and MFU against the bf16 matmul measured in the same run and
against the data-sheet peak, peak memory, and for compiled variants the compile time (the first
call, which compiles, minus one steady-state step) and the graph count and graph breaks.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import FlexDocumentAttention, require_torch_varlen, torch_varlen_attention  # noqa: E402
from common import Case, Unavailable, first_call_s, measure, training_flops, vit_flops  # noqa: E402
from profile_kernels import format_breakdown, kernel_breakdown  # noqa: E402

MODELS = ("ViT-B-32", "ViT-B-16")
QUICK_MODELS = ("stop-tiny", "ViT-B-32")
# The quick run (minutes on 2 CPU cores): one compile only, for the smallest model.
QUICK_CASES = {("stop-tiny", "fast_compiled", "inference")} | {
    (name, variant, mode) for name in QUICK_MODELS for variant in ("reference", "fast") for mode in ("inference", "train")}
VARIANTS = ("reference", "fast", "fast_compiled", "fast_compiled_cudagraphs", "openclip_compiled",
            "padded_sdpa_compiled", "fast_torch_varlen_attn", "fast_flex_attention")
# Run order under a time budget (lower first): the eager paths of both backbones, the compiled fast
# path, the baselines' inference, attention swaps, then what compiles longest; ViT-B/16 after B/32.
PRIORITY = {"reference": 0, "fast": 0, "fast_compiled": 2, "openclip_compiled": 3, "padded_sdpa_compiled": 3,
            "fast_compiled_cudagraphs": 4, "fast_torch_varlen_attn": 4, "fast_flex_attention": 4}
COMPILED = {"fast_compiled", "fast_compiled_cudagraphs", "openclip_compiled", "padded_sdpa_compiled"}
# variants measured for inference only: CUDA graphs need the static-shape mode, an inference option
INFERENCE_ONLY = {"fast_compiled_cudagraphs"}
MODES = ("inference", "train")
CPU_SKIPS = {
    "fast_compiled_cudagraphs": "CUDA graphs: CUDA only",
    "fast_torch_varlen_attn": "varlen_attn runs flash attention kernels: CUDA only",
    "fast_flex_attention": "FlexAttention compiles a CPU kernel for minutes; run it on a GPU",
}


def priority(name: str, variant: str, mode: str) -> int:
    """Cases run in this order under a time budget (lower first), see PRIORITY."""
    p = PRIORITY[variant] + (3 if variant in ("openclip_compiled", "padded_sdpa_compiled") and mode == "train" else 0)
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
    """One (backbone, B, T, rho) point: the model, the timed batch, its token counts and FLOPs."""

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
        self.reference_features: Optional[torch.Tensor] = None

    def tokens(self, variant: str) -> Dict[str, Any]:
        lengths = self.clip_lengths if variant == "openclip_compiled" else self.stop_lengths
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


# --------------------------------------------------------------------------- the variants
def sdpa_transformer_padded(visual, sequences: torch.Tensor, lengths: torch.Tensor, *_options) -> torch.Tensor:
    """The reference's padded transformer the way a user writes it with SDPA: ``(F, 1, 1, L)`` boolean
    key-padding mask broadcast over heads and queries (the reference builds a float ``(F*heads, L, L)``
    mask for nn.MultiheadAttention). Same blocks, same function; returns the CLS tokens (F, D).
    Options of the reference's function (gradient checkpointing) are not used here."""
    f, length, width = sequences.shape
    keep = (torch.arange(length, device=sequences.device)[None, :] < lengths[:, None])[:, None, None, :]
    x = visual.ln_pre(sequences)
    for block in visual.transformer.resblocks:
        heads = block.attn.num_heads
        qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
        q, k, v = qkv.view(f, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(f, length, width)
        x = x + block.ls_1(block.attn.out_proj(o))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x[:, 0]


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
        setup.compiled[variant] = build_compiled(model, variant, getattr(setup.ctx, "compile_mode", None))
    return setup.compiled[variant]


def build_compiled(model, variant: str, mode: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mode``: ``torch.compile``'s mode for the fast path and both compiled baselines alike (a
    fair comparison compiles them the same way); the CUDA-graphs variant keeps "reduce-overhead"."""
    options = {"mode": mode} if mode else {}
    if variant in ("fast_compiled", "fast_compiled_cudagraphs", "padded_sdpa_compiled"):
        try:
            from stop_fast.model.compiled import compile_encoder
        except ImportError:
            raise Unavailable("this stop_fast has no stop_fast.model.compiled.compile_encoder") from None
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
    if variant == "padded_sdpa_compiled":
        from stop_fast.model import reference

        # the reference path, compiled the same way as the fast one, with its transformer swapped for
        # the SDPA one; patched around every call, so the compiled graph (which guards on that
        # global) always sees the same function
        compiled = compile_encoder(model, impl="reference", **options)

        def padded(video):
            with mock.patch.object(reference, "run_transformer_padded", sdpa_transformer_padded):
                return compiled(video)

        return padded
    raise ValueError(f"unknown variant {variant!r}")


def step_function(setup: Setup, variant: str, mode: str) -> Callable[[], Any]:
    ctx, encode = setup.ctx, encoder(setup, variant)
    if mode == "inference":
        def infer():
            with torch.no_grad(), amp(ctx):
                return encode(setup.video)
        return infer
    if variant == "openclip_compiled":  # no prompts to train: the gradient goes into the video
        video = setup.video.clone().requires_grad_()
        params = [video]
    else:
        video = setup.video
        params = list(setup.model.trainable_parameters())

    def train():
        for p in params:
            p.grad = None
        with amp(ctx):
            feats = encode(video)
        (feats.float() * setup.target).sum().backward()
    return train


# --------------------------------------------------------------------------- one case
def run_case(ctx, setup_fn: Callable[[], Setup], variant: str, mode: str,
             timing: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    if ctx.device.type == "cpu" and variant in CPU_SKIPS:
        return {"skipped": CPU_SKIPS[variant]}
    setup = setup_fn()
    record: Dict[str, Any] = {"model": setup.name, "variant": variant, "mode": mode, "batch": setup.batch,
                              "frames": setup.frames, "rho": setup.model.config.rho,
                              "precision": "bf16 autocast, backbone cast to bf16" if ctx.bf16 else "fp32",
                              "tokens": setup.tokens(variant)}
    fn = step_function(setup, variant, mode)
    if variant in COMPILED:
        record.update(compile_first_call(fn, ctx.device))
    timing = measure(fn, ctx.device, **(timing or ctx.timing))
    record.update(timing)
    if ctx.profile:
        record["profile"] = kernel_breakdown(fn, ctx.device)
        print(format_breakdown(f"model/{setup.name}/{variant}/{mode}", record["profile"]), flush=True)
    if "first_call_s" in record:
        record["compile_s"] = max(record["first_call_s"] - timing["median_ms"] / 1e3, 0.0)
    seconds = timing["median_ms"] / 1e3
    record["videos_per_s"] = setup.batch / seconds
    flops = setup.clip_flops if variant == "openclip_compiled" else setup.stop_flops
    total = flops["forward"] if mode == "inference" else training_flops(flops, input_grad=variant == "openclip_compiled")
    record["flops"] = total
    record["flops_note"] = "useful work on the real (unpadded) tokens; padded variants compute more"
    record["tflops"] = total / seconds / 1e12
    if ctx.compute_ceiling:
        record["mfu_vs_measured_matmul"] = record["tflops"] / ctx.compute_ceiling
    if ctx.ceilings.get("datasheet_bf16_tflops") and ctx.bf16:
        record["mfu_vs_datasheet"] = record["tflops"] / ctx.ceilings["datasheet_bf16_tflops"]
    if mode == "inference" and variant not in ("reference", "openclip_compiled"):
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


# --------------------------------------------------------------------------- cases for run.py
def cases(ctx) -> List[Case]:
    out = []
    for name in (QUICK_MODELS if ctx.quick else MODELS):
        batch = ctx.quick_batch(name) if ctx.quick else ctx.batch

        def setup_fn(name=name, batch=batch) -> Setup:
            return ctx.current_setup(Setup, name, batch, ctx.frames, 12)

        for variant in VARIANTS:
            if variant in COMPILED and ctx.device.type == "cpu" and not ctx.compile_on_cpu:
                continue
            for mode in MODES:
                if variant in INFERENCE_ONLY and mode != "inference":
                    continue
                if ctx.quick and (name, variant, mode) not in QUICK_CASES:
                    continue
                estimate = ctx.compile_estimate if variant in COMPILED else (30 if "flex" in variant else 10)
                out.append(Case(f"model/{name}/{variant}/{mode}",
                                lambda setup_fn=setup_fn, variant=variant, mode=mode: run_case(ctx, setup_fn, variant, mode),
                                estimate_s=estimate, priority=priority(name, variant, mode)))
    return out
