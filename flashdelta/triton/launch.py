"""Kernel launches that skip Triton's per-call binding where a call's layout repeats.

`fn[grid](*args, **kwargs)` spends 25-65 us of host time per launch on the H100 machine's CPU
(NOTES.md v4.4, v4.8) before the compiled launcher runs: the argument binder and its
specialisation, the cache key, the launch metadata. A short prefill makes five or six
launches, so its host time exceeds its GPU time below ~8K tokens.

What a launch specialises on is fixed by its arguments' types: a tensor's dtype and whether
its address is a multiple of 16, whether an integer is 1, a multiple of 16, 32 or 64 bits; a
TMA descriptor's dtype, tile and layout (floats and bools are not specialised). Within one
prefill entry point every launch argument is a function of the call's inputs (their shapes,
strides, dtypes and address alignments), the sequence layout and the tuning: internal
buffers are fresh allocations of sizes those fix, at addresses the allocator aligns to 512
bytes. So the caller keys a `Sites` table by those inputs (`call_sites`); the first call
of a layout launches through Triton and keeps each compiled kernel, later calls hand the same
argument list straight to the kernel's launcher. A check of the constexpr values and the
Nones against the compiled ones sends anything the key missed back through Triton.
"""

from __future__ import annotations

import collections
import inspect

import torch

from .common import interpreting

try:
    from triton import knobs
except ImportError:  # an older Triton: no launch hooks to respect
    knobs = None


class Sites(dict):
    """One call layout's compiled kernels: site name -> (kernel, the parameters after the
    positional arguments as (name, default) pairs, the constexpr parameters' positions,
    `_constants`); a caller may keep its own host decisions for the layout beside them (the
    prefill: "setup")."""


class SitesCache:
    """Sites tables by call key, the least recently used dropped past `size`."""

    def __init__(self, size: int = 64):
        self.size = size
        self.tables: collections.OrderedDict = collections.OrderedDict()

    def get(self, key) -> Sites:
        sites = self.tables.get(key)
        if sites is None:
            sites = self.tables[key] = Sites()
            if len(self.tables) > self.size:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(key)
        return sites


_CACHE = SitesCache(size=256)


def layout_key(device_index: int, tensors: tuple, *extra) -> tuple:
    """What fixes the specialisation of every launch argument derived from these inputs: the
    device, `extra` (flags, tuning, sequence layout) and each tensor's dtype, shape, strides
    and address modulo 16 (None for an absent one)."""
    return (device_index, *extra,
            *(None if t is None else (t.dtype, t.shape, t.stride(), t.data_ptr() & 15) for t in tensors))


def call_sites(enabled: bool, device: torch.device, tensors: tuple, *extra) -> tuple:
    """(this call layout's Sites, the device index), or (None, 0) where launches go through
    Triton: `enabled` off (A/B checks), not CUDA, or the interpreter."""
    if not enabled or device.type != "cuda" or interpreting():
        return None, 0
    index = torch.cuda.current_device()  # (where Triton launches; the tensors' device is keyed too)
    return _CACHE.get(layout_key(index, tensors, device, *extra)), index


def _tail(fn, n_args: int) -> tuple:
    """The kernel parameters after the first n_args, with their defaults (None where none)."""
    params = list(inspect.signature(fn.fn).parameters.values())[n_args:]
    return tuple((p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params)


def _hooks_set() -> bool:
    """Whether launch hooks are registered (a profiler): then every launch goes through Triton."""
    if knobs is None:
        return False
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def bound_arguments(tail: tuple, args: tuple, kwargs: dict) -> list:
    """Every kernel parameter's value in signature order (what Triton's binder passes to the
    launcher): the positional arguments, then each later parameter from kwargs or its default."""
    return [*args, *(kwargs[name] if name in kwargs else default for name, default in tail)]


def _constants(index: tuple, full: list) -> tuple:
    """What the compiled kernel fixed beyond the layout key: the constexpr parameters' values
    (at `index`) and which arguments are None (Triton compiles a None as a constant)."""
    return tuple(full[i] for i in index), tuple(i for i, x in enumerate(full) if x is None)


def launch(sites: Sites | None, name: str, fn, grid: tuple, args: tuple, kwargs: dict, device_index: int = 0):
    """fn[grid](*args, **kwargs), or, where `sites` holds this site's compiled kernel for the
    same constants, that kernel's launcher on the current stream of `device_index` with the
    same arguments. `sites` None: always through Triton (the interpreter, A/B checks)."""
    if sites is None or _hooks_set():
        fn[grid](*args, **kwargs)
        return
    entry = sites.get(name)
    if entry is not None:
        kernel, tail, index, constants = entry
        full = bound_arguments(tail, args, kwargs)
        if _constants(index, full) == constants:  # (a constant outside the key: compile through Triton)
            g = (*grid, 1, 1)
            kernel.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device_index), kernel.function,
                       kernel.packed_metadata, None, None, None, *full)
            return
    kernel = fn[grid](*args, **kwargs)
    if hasattr(kernel, "result"):  # (asynchronous compilation)
        kernel = kernel.result()
    tail = _tail(fn, len(args))
    index = tuple(p.num for p in getattr(fn, "params", ()) if p.is_constexpr)
    sites[name] = (kernel, tail, index, _constants(index, bound_arguments(tail, args, kwargs)))
