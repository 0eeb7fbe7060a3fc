"""`gated_delta_rule` picks a path by sequence length; `mode` and FLASHDELTA_MODE force one."""

import pytest
import torch

import flashdelta as fd
import flashdelta.reference as ref
from flashdelta.testing import make_case


@pytest.fixture
def spy(monkeypatch):
    seen = []
    chunk, rec = ref.chunk_gated_delta_rule, ref.recurrent_gated_delta_rule
    monkeypatch.setattr(ref, "chunk_gated_delta_rule", lambda *a, **k: seen.append("chunk") or chunk(*a, **k))
    monkeypatch.setattr(ref, "recurrent_gated_delta_rule", lambda *a, **k: seen.append("recurrent") or rec(*a, **k))
    monkeypatch.delenv("FLASHDELTA_MODE", raising=False)
    return seen


def test_auto_threshold(spy):
    limit = fd.RECURRENT_MAX_TOKENS["torch"]
    for t_len, path in [(1, "recurrent"), (limit, "recurrent"), (limit + 1, "chunk"), (300, "chunk")]:
        fd.gated_delta_rule(*make_case("random", seq_len=t_len).args(), backend="torch")
        assert spy[-1] == path, t_len


def test_recurrent_max_tokens_by_dtype_and_head_dim():
    """fp32 on Triton keeps the token loop longer (its chunked products are 3xTF32), the more so
    at larger K; every other backend and dtype takes RECURRENT_MAX_TOKENS."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for dim in (32, 64, 128, 256):
            assert fd.recurrent_max_tokens("torch", dtype, dim) == fd.RECURRENT_MAX_TOKENS["torch"]
            if dtype != torch.float32:
                assert fd.recurrent_max_tokens("triton", dtype, dim) == fd.RECURRENT_MAX_TOKENS["triton"]
    fp32 = [fd.recurrent_max_tokens("triton", torch.float32, dim) for dim in (32, 64, 96, 128, 256)]
    assert fp32 == [256, 256, 1024, 1024, float("inf")]


@pytest.mark.parametrize("dtype, dim, t_len, path", [
    (torch.bfloat16, 128, 256, "recurrent"), (torch.bfloat16, 128, 257, "chunk"),
    (torch.float32, 128, 1024, "recurrent"), (torch.float32, 128, 1025, "chunk"),
    (torch.float32, 64, 257, "chunk"), (torch.float32, 256, 4096, "recurrent")])
def test_auto_threshold_triton(monkeypatch, dtype, dim, t_len, path):
    """The Triton backend's choice in `gated_delta_rule` (both paths replaced by spies: only the
    decision is under test, on any machine)."""
    seen = []

    def spy(name):
        return lambda q, k, v, *a, **kw: seen.append(name) or (torch.empty_like(v), None)

    fake = fd.backends.Backend("triton", spy("chunk"), spy("recurrent"), None)
    monkeypatch.setattr(fd.backends, "select", lambda backend, device: fake)
    monkeypatch.delenv("FLASHDELTA_MODE", raising=False)
    case = make_case("random", dtype, seq_len=t_len, heads=1, dk=dim)
    fd.gated_delta_rule(*case.args(), backend="triton")
    assert seen == [path]


def test_auto_uses_tokens_per_sequence_with_varlen(spy):
    # 64 single-token sequences packed in one call: decode-like, so recurrent.
    case = make_case("random", batch=1, seq_len=64)
    fd.gated_delta_rule(*case.args(), cu_seqlens=torch.arange(65), backend="torch")
    assert spy[-1] == "recurrent"


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_mode_argument_forces_path(spy, mode):
    for t_len in (1, 300):
        fd.gated_delta_rule(*make_case("random", seq_len=t_len).args(), mode=mode)
        assert spy[-1] == mode


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_env_var_forces_path(spy, monkeypatch, mode):
    monkeypatch.setenv("FLASHDELTA_MODE", mode)
    for t_len in (1, 300):
        fd.gated_delta_rule(*make_case("random", seq_len=t_len).args())
        assert spy[-1] == mode


def test_explicit_mode_beats_env(spy, monkeypatch):
    monkeypatch.setenv("FLASHDELTA_MODE", "recurrent")
    fd.gated_delta_rule(*make_case("random", seq_len=300).args(), mode="chunk")
    assert spy[-1] == "chunk"


def test_default_backend_on_cpu_is_torch(spy):
    fd.gated_delta_rule(*make_case("random", seq_len=100).args())
    assert spy == ["chunk"]


class _CountingOffsets(torch.Tensor):
    """cu_seqlens that counts its host reads (each is a device sync on a GPU)."""

    reads = 0

    def tolist(self):
        type(self).reads += 1
        return super().tolist()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
def test_cu_seqlens_read_once(op, backend, device):
    """Validation reads cu_seqlens on the host once; the paths reuse that copy."""
    if backend == "triton":
        pytest.importorskip("triton")
    case = make_case("varlen", torch.float32, device, seed=0, dk=16)
    kw = dict(case.kwargs)
    _CountingOffsets.reads = 0
    kw["cu_seqlens"] = kw["cu_seqlens"].as_subclass(_CountingOffsets)
    o, _ = getattr(fd, op)(*case.args(), output_final_state=True, backend=backend, **kw)
    assert torch.isfinite(o).all()
    assert _CountingOffsets.reads == 1
