"""Triton kernels of STOP's fast path, each with a PyTorch implementation of identical semantics.

Functional entry points only; each op is a ``torch.library`` custom op with a registered autograd
formula, so ``torch.compile`` traces models that use them. Triton runs for CUDA tensors, and for CPU
tensors when ``TRITON_INTERPRET=1`` was set before triton was imported; elsewhere PyTorch does.
Modules: ``attention`` (varlen attention), ``scoring`` (patch scores and top-K), ``packing``
(packed sequence build). Faster variants of some kernels that no GPU has measured yet are off by
default and switched on by name (``STOP_FAST_KERNEL_VARIANTS``, or the entries' keyword arguments;
``dispatch.VARIANTS`` lists them).
"""
from .attention import varlen_attention, varlen_attention_qkvpacked
from .packing import cu_seqlens_from_counts, pack_sequences
from .scoring import PatchScores, patch_scores

__all__ = ["varlen_attention", "varlen_attention_qkvpacked", "patch_scores", "PatchScores", "pack_sequences",
           "cu_seqlens_from_counts"]
