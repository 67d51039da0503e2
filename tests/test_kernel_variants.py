"""The switch of the kernel variants (``stop_fast.kernels.dispatch``): off by default, on by name through
STOP_FAST_KERNEL_VARIANTS or per call, unknown names refused. The variants themselves are tested in
test_kernel_scoring_split.py, test_kernel_attention_short.py and test_kernel_pack_bucketed.py."""
import os

import pytest
import torch

from stop_fast.kernels import dispatch, patch_scores, varlen_attention


def test_every_variant_is_off_by_default(monkeypatch):
    monkeypatch.delenv(dispatch.VARIANTS_ENV, raising=False)
    assert dispatch.enabled_variants() == frozenset()
    assert not any(dispatch.variant_enabled(name) for name in dispatch.VARIANTS)
    assert set(dispatch.VARIANTS) == {"scoring_split", "attn_bwd_short", "pack_bucketed"}


@pytest.mark.parametrize("value, expected", [
    ("scoring_split", {"scoring_split"}),
    (" attn_bwd_short , pack_bucketed ,", {"attn_bwd_short", "pack_bucketed"}),
    ("all", {"scoring_split", "attn_bwd_short", "pack_bucketed"}),
    ("", set()),
])
def test_the_environment_variable_names_them(value, expected, monkeypatch):
    monkeypatch.setenv(dispatch.VARIANTS_ENV, value)
    assert dispatch.enabled_variants() == expected
    for name in dispatch.VARIANTS:
        assert dispatch.variant_enabled(name) == (name in expected)
        assert dispatch.variant_enabled(name, True) and not dispatch.variant_enabled(name, False)  # the keyword wins


def test_unknown_names_are_refused(monkeypatch):
    monkeypatch.setenv(dispatch.VARIANTS_ENV, "scoring_split,scoring_spilt")
    with pytest.raises(ValueError, match="unknown kernel variants \\['scoring_spilt'\\]"):
        dispatch.enabled_variants()
    with pytest.raises(ValueError, match="unknown kernel variants"):  # at the op's entry, before any launch
        patch_scores(torch.randn(2, 10, 16), torch.randn(2, 16), torch.randn(2), torch.randn(2, 9), None, 3, 0.4, 4.0)
    monkeypatch.delenv(dispatch.VARIANTS_ENV)
    with pytest.raises(ValueError, match="unknown kernel variant 'attn_bwd'"):
        dispatch.variant_enabled("attn_bwd")
    with pytest.raises(ValueError, match="unknown kernel variant"):
        with dispatch.kernel_variants("pack"):
            pass


def test_the_context_manager_restores_the_variable(monkeypatch):
    monkeypatch.setenv(dispatch.VARIANTS_ENV, "pack_bucketed")
    with dispatch.kernel_variants("scoring_split", "attn_bwd_short"):
        assert dispatch.enabled_variants() == {"scoring_split", "attn_bwd_short"}
        with dispatch.kernel_variants():
            assert dispatch.enabled_variants() == frozenset()
    assert os.environ[dispatch.VARIANTS_ENV] == "pack_bucketed"
    monkeypatch.delenv(dispatch.VARIANTS_ENV)
    with pytest.raises(RuntimeError):
        with dispatch.kernel_variants("all"):
            raise RuntimeError
    assert dispatch.VARIANTS_ENV not in os.environ


def test_the_pytorch_implementations_ignore_the_variants(monkeypatch):
    """Without Triton every op runs its PyTorch implementation, variant or not: the same numbers."""
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    cu = torch.tensor([0, 70, 75], dtype=torch.int32)
    q, k, v = (torch.randn(75, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = varlen_attention(q, k, v, cu, 70, short_backward=True)
    b = varlen_attention(q, k, v, cu, 70, short_backward=False)
    assert torch.equal(a, b)
    u, keys, bias, dyn = torch.randn(3, 10, 16), torch.randn(2, 16), torch.randn(2), torch.randn(3, 9)
    x, y = (patch_scores(u, keys, bias, dyn, None, 3, 0.4, 4.0, split=s) for s in (True, False))
    assert all(torch.equal(p, r) for p, r in zip(x[:5], y[:5]))
