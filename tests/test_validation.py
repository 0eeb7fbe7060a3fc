"""Every bad input gets a ValueError/TypeError naming the argument, before any computation."""

import pytest
import torch

import flashdelta as fd

B, T, H, HV, K, V = 2, 10, 2, 4, 8, 6


def good(**over):
    args = dict(
        q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, HV, V),
        g=-torch.rand(B, T, HV), beta=torch.rand(B, T, HV),
    )
    args.update(over)
    return args


def varlen(**over):
    args = dict(
        q=torch.randn(1, T, H, K), k=torch.randn(1, T, H, K), v=torch.randn(1, T, HV, V),
        g=-torch.rand(1, T, HV), beta=torch.rand(1, T, HV), cu_seqlens=torch.tensor([0, 4, T]),
    )
    args.update(over)
    return args


BAD = {
    # name: (kwargs, exception, words the message must contain)
    "q_rank": (good(q=torch.randn(B, T, H * K)), ValueError, ["q", "4-D"]),
    "k_shape": (good(k=torch.randn(B, T, H, K + 1)), ValueError, ["k", "shape"]),
    "v_rank": (good(v=torch.randn(B, T, HV * V)), ValueError, ["v", "4-D"]),
    "v_batch": (good(v=torch.randn(B + 1, T, HV, V)), ValueError, ["v", "B, T"]),
    "v_time": (good(v=torch.randn(B, T + 1, HV, V)), ValueError, ["v", "B, T"]),
    "hv_not_multiple": (good(v=torch.randn(B, T, 3, V), g=-torch.rand(B, T, 3), beta=torch.rand(B, T, 3)),
                        ValueError, ["HV", "multiple"]),
    "g_rank": (good(g=-torch.rand(B, T, HV, 1)), ValueError, ["g", "3-D"]),
    "g_heads": (good(g=-torch.rand(B, T, H)), ValueError, ["g", "[B, T, HV]"]),
    "beta_shape": (good(beta=torch.rand(B, T + 1, HV)), ValueError, ["beta", "[B, T, HV]"]),
    "beta_rank": (good(beta=torch.rand(B, T)), ValueError, ["beta", "3-D"]),
    "qkv_dtype_mismatch": (good(k=torch.randn(B, T, H, K, dtype=torch.float64)), TypeError, ["k", "dtype"]),
    "v_dtype_mismatch": (good(v=torch.randn(B, T, HV, V).bfloat16()), TypeError, ["v", "dtype"]),
    "q_integer": (good(q=torch.ones(B, T, H, K, dtype=torch.int32)), TypeError, ["q", "floating"]),
    "g_integer": (good(g=torch.zeros(B, T, HV, dtype=torch.int64)), TypeError, ["g", "floating"]),
    "beta_integer": (good(beta=torch.ones(B, T, HV, dtype=torch.int64)), TypeError, ["beta", "floating"]),
    "q_not_tensor": (good(q=[[1.0]]), TypeError, ["q", "torch.Tensor"]),
    "device_mismatch": (good(g=-torch.rand(B, T, HV, device="meta")), ValueError, ["g", "device"]),
    "state_shape": (good(initial_state=torch.zeros(B, HV, K, V + 1)), ValueError, ["initial_state", "[N, HV, K, V]"]),
    "state_count": (good(initial_state=torch.zeros(B + 1, HV, K, V)), ValueError, ["initial_state", "[N, HV, K, V]"]),
    "state_dtype": (good(initial_state=torch.zeros(B, HV, K, V, dtype=torch.bfloat16)), TypeError,
                    ["initial_state", "float32"]),
    "state_count_varlen": (varlen(initial_state=torch.zeros(1, HV, K, V)), ValueError, ["initial_state", "(2,"]),
    "cu_not_1d": (varlen(cu_seqlens=torch.tensor([[0, 4, T]])), ValueError, ["cu_seqlens", "1-D"]),
    "cu_float": (varlen(cu_seqlens=torch.tensor([0.0, 4.0, T])), TypeError, ["cu_seqlens", "integer"]),
    "cu_list": (varlen(cu_seqlens=[0, 4, T]), TypeError, ["cu_seqlens", "torch.Tensor"]),
    "cu_start": (varlen(cu_seqlens=torch.tensor([1, 4, T])), ValueError, ["cu_seqlens", "start at 0"]),
    "cu_decreasing": (varlen(cu_seqlens=torch.tensor([0, 6, 4, T])), ValueError, ["cu_seqlens", "non-decreasing"]),
    "cu_end": (varlen(cu_seqlens=torch.tensor([0, 4, T - 1])), ValueError, ["cu_seqlens", "end at T"]),
    "cu_with_batch": (good(cu_seqlens=torch.tensor([0, 4, T])), ValueError, ["cu_seqlens", "B = 1"]),
    "scale_zero": (good(scale=0.0), ValueError, ["scale", "positive"]),
    "scale_negative": (good(scale=-1.0), ValueError, ["scale", "positive"]),
    "scale_nan": (good(scale=float("nan")), ValueError, ["scale"]),
    "scale_string": (good(scale="0.5"), TypeError, ["scale"]),
    "scale_bool": (good(scale=True), TypeError, ["scale"]),
    "backend_unknown": (good(backend="cuda"), ValueError, ["backend", "torch"]),
}


@pytest.mark.parametrize("fn", [fd.chunk_gated_delta_rule, fd.fused_recurrent_gated_delta_rule, fd.gated_delta_rule],
                         ids=["chunk", "recurrent", "auto"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_rejected(name, fn):
    kwargs, exc, words = BAD[name]
    with pytest.raises(exc) as info:
        fn(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("mode", ["fast", "Chunk", None])
def test_unknown_mode(mode):
    with pytest.raises(ValueError, match="mode"):
        fd.gated_delta_rule(**good(), mode=mode)


def test_unknown_mode_in_env(monkeypatch):
    monkeypatch.setenv("FLASHDELTA_MODE", "fastest")
    with pytest.raises(ValueError, match="FLASHDELTA_MODE"):
        fd.gated_delta_rule(**good())


def test_validation_runs_before_any_computation(monkeypatch):
    """A bad cu_seqlens must be caught even though the kernel would have produced something."""
    import flashdelta.reference as ref

    called = []
    monkeypatch.setattr(ref, "chunk_gated_delta_rule", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError):
        fd.chunk_gated_delta_rule(**varlen(cu_seqlens=torch.tensor([0, 4, T + 3])))
    assert not called


def test_unavailable_backend_is_an_error_not_a_fallback():
    from flashdelta.backends import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device("cpu"))
    if reason is None:
        pytest.skip("the triton backend is usable here")
    with pytest.raises(RuntimeError, match="triton"):
        fd.chunk_gated_delta_rule(**good(), backend="triton")
