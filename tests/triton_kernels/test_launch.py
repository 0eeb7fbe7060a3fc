"""The direct launches of `flashdelta.triton.launch`, on the CPU: the argument list handed to a
compiled kernel's launcher must be what Triton's binder would give it (every parameter in
signature order, defaults filled in), at every launch site of the prefill; a repeated site
must go to the launcher, a new one through Triton; the call key must tell apart what changes
a launch's specialisation. The GPU test (`test_gpu.py::test_fast_launch_*`) checks the results
bitwise against Triton's own launches."""

import inspect

import pytest
import torch

from flashdelta.testing import make_case
from flashdelta.triton import chunk as tc
from flashdelta.triton import launch as fl


def _binder_values(fn, args, kwargs) -> list:
    """What Triton's binder passes to the launcher: all parameters, defaults applied (launch
    options such as num_warps are not parameters)."""
    sig = inspect.signature(fn.fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    return list(bound.arguments.values())


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x is y or (type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("kind, partition_chunks, lead", [
    ("random", None, False), ("strong_decay", 2, False), ("strong_decay", 2, True), ("strong_decay", 2, "adaptive"),
    ("varlen", 1, False)])
def test_bound_arguments_at_every_prefill_site(kind, partition_chunks, lead, monkeypatch, device):
    calls = []

    def recording_launch(sites, name, fn, grid, args, kwargs, device_index=0):
        calls.append((name, fn, args, kwargs))
        fn[grid](*args, **kwargs)

    monkeypatch.setattr(tc, "launch", recording_launch)
    monkeypatch.setitem(tc.TUNING, "lead_partition", lead)
    case = make_case(kind, torch.float32, device, seed=5, seq_len=300, heads=1, value_heads=2, dk=32)
    tc.chunk_gated_delta_rule_fwd(*case.args(), 32**-0.5, case.kwargs.get("initial_state"), True,
                                  case.kwargs.get("cu_seqlens"), partition_chunks=partition_chunks)
    names = [c[0] for c in calls]
    assert names[0] == "inverse" and names[-1] == "output pass"
    if partition_chunks:
        assert "map pass" in names and "chain" in names
    if lead is True or lead == "adaptive":
        assert "lead pass" in names
    for name, fn, args, kwargs in calls:
        got = fl.bound_arguments(fl._tail(fn, len(args)), args, kwargs)
        assert _same(got, _binder_values(fn, args, kwargs)), name


def test_bound_arguments_decode_and_token_loop_sites(monkeypatch, device):
    """The decode step's and the token loop's launches (run here in the interpreter)."""
    import flashdelta as fd
    from flashdelta.bench import Shape, _decode_step, make_decode_inputs
    from flashdelta.triton import decode as td
    from flashdelta.triton import recurrent as tr

    calls = []

    def recording_launch(sites, name, fn, grid, args, kwargs, device_index=0):
        calls.append((name, fn, args, kwargs))
        fn[grid](*args, **kwargs)

    monkeypatch.setattr(td, "launch", recording_launch)
    monkeypatch.setattr(tr, "launch", recording_launch)
    d = make_decode_inputs(Shape("decode", "d", [2, 2], 2, 4, dk=32, dv=32, slots=8), device)
    _decode_step("triton")(d)
    fd.fused_recurrent_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], d["beta"], initial_state=d["h0"],
                                        output_final_state=True, backend="triton")
    assert [c[0] for c in calls] == ["decode", "token loop"]
    for name, fn, args, kwargs in calls:
        assert _same(fl.bound_arguments(fl._tail(fn, len(args)), args, kwargs), _binder_values(fn, args, kwargs))


def test_bound_arguments_gluon_sites(monkeypatch):
    """The Gluon passes' launches (they do not run here: the arguments are checked, not run)."""
    pytest.importorskip("triton.experimental.gluon")
    from flashdelta.triton import chunk_sm90

    calls = []
    monkeypatch.setattr(chunk_sm90, "launch", lambda sites, name, fn, grid, args, kwargs, device_index=0:
                        calls.append((name, fn, args, kwargs)))
    q = k = torch.zeros(1, 128, 2, 128, dtype=torch.bfloat16)
    v = torch.zeros(1, 128, 4, 128, dtype=torch.bfloat16)
    gcum = torch.zeros(1, 128, 4, 2)
    rows = torch.zeros(3, 6, dtype=torch.int32)
    descs = tuple(object() for _ in range(4))
    chunk_sm90.map_pass(q, k, v, gcum, None, gcum, gcum, rows, 3, 4, 2, descs=descs, warm=rows)
    chunk_sm90.output_pass(q, k, v, gcum, None, v, None, gcum, rows, 3, True, 0.1, 4, 2, descs=descs,
                           may_be_empty=True, site="lead pass")
    assert [c[0] for c in calls] == ["map pass", "lead pass"]
    for name, fn, args, kwargs in calls:
        assert _same(fl.bound_arguments(fl._tail(fn, len(args)), args, kwargs), _binder_values(fn, args, kwargs))


class _Compiled:
    def __init__(self):
        self.runs = []
        self.function, self.packed_metadata = "function", "metadata"

    def run(self, *args):
        self.runs.append(args)


class _Kernel:
    """A jit function stand-in: kernel[grid](...) records and returns one compiled kernel."""

    def __init__(self):
        self.compiled, self.slow = _Compiled(), []

        def fn(a, b, C: int = 3, D=None):
            pass
        self.fn = fn
        self.params = [type("Param", (), dict(num=i, is_constexpr=name == "C"))() for i, name in enumerate("abCD")]

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return self.compiled
        return call


def test_launch_first_through_triton_then_direct(monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    kernel, sites = _Kernel(), fl.Sites()
    fl.launch(sites, "k", kernel, (4,), ("x", 2), dict(D=7, num_warps=4), 1)
    assert len(kernel.slow) == 1 and not kernel.compiled.runs
    fl.launch(sites, "k", kernel, (4, 2), ("y", 5), dict(D=8, num_warps=4), 1)
    assert len(kernel.slow) == 1
    assert kernel.compiled.runs == [(4, 2, 1, 1001, "function", "metadata", None, None, None, "y", 5, 3, 8)]
    fl.launch(None, "k", kernel, (4,), ("z", 1), {}, 1)  # no table: always through Triton
    assert len(kernel.slow) == 2


def test_launch_recompiles_where_a_constant_changes(monkeypatch):
    """A constexpr value or a None the table's kernel was not compiled for (something outside
    the layout key) goes through Triton, and its kernel replaces the site's."""
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    kernel, sites = _Kernel(), fl.Sites()
    fl.launch(sites, "k", kernel, (1,), ("x", 2), dict(D=7))
    fl.launch(sites, "k", kernel, (1,), ("x", 2), dict(C=4, D=7))  # another constexpr value
    fl.launch(sites, "k", kernel, (1,), ("x", 2), dict(C=4, D=None))  # a None where a value was
    assert len(kernel.slow) == 3 and not kernel.compiled.runs
    fl.launch(sites, "k", kernel, (1,), ("y", 2), dict(C=4))
    assert len(kernel.slow) == 3 and len(kernel.compiled.runs) == 1


def test_launch_hooks_go_through_triton(monkeypatch):
    from triton import knobs

    kernel, sites = _Kernel(), fl.Sites()
    fl.launch(sites, "k", kernel, (1,), ("x", 2), {})
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        fl.launch(sites, "k", kernel, (1,), ("x", 2), {})
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.slow) == 2 and not kernel.compiled.runs


def test_no_direct_launches_off_cuda(monkeypatch):
    """The interpreter and CPU tensors always launch through Triton, as does the switch off."""
    assert fl.call_sites(True, torch.device("cpu"), ()) == (None, 0)
    assert fl.call_sites(False, torch.device("cuda"), ()) == (None, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fl.call_sites(True, torch.device("cuda"), ()) == (None, 0)


def test_call_key_separates_specialisations():
    x = torch.zeros(2, 64, 4, 32)
    key = lambda *ts, flags=(None, True, False): fl.layout_key(0, ts, ((0, 0, 64),), flags, tuple(tc.TUNING.items()))  # noqa: E731
    base = key(x, x)
    assert key(x, x) == base
    assert key(x[:, :, :, 1:17], x) != base  # address modulo 16 and shape
    assert key(torch.zeros(2, 64, 4, 32, dtype=torch.bfloat16), x) != base
    assert key(x.transpose(1, 2).contiguous().transpose(1, 2), x) != base  # strides
    assert key(x, None) != base
    assert key(x, x, flags=(None, False, False)) != base
    assert fl.layout_key(1, (x, x), ((0, 0, 64),), (None, True, False), tuple(tc.TUNING.items())) != base
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tc.TUNING, "lead_partition", True)
        assert key(x, x) != base


def test_sites_cache_is_bounded():
    cache = fl.SitesCache(size=2)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a
    cache.get("c")  # drops "b", the least recently used
    assert set(cache.tables) == {"a", "c"}
