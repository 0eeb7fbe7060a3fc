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
