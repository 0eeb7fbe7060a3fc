"""Parity cases, the float64 oracle and the error metric, shared by the tests and `flashdelta check`.

Each case is a set of inputs in the public layout, drawn fresh from a seed, including
the adversarial ones that broke other implementations (../shared/seeds): near-identical
keys with beta ~ 1 (raw-powers inverse overflow), cyclic keys, very strong decay
(exp(-cumsum) overflow), beta in [0, 2) with exact zeros, K != V with grouped value
heads, large initial states, and varlen batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .reference import recurrent_gated_delta_rule

# Relative L2 error allowed against the float64 oracle, by input dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

SEQ_LENS = (1, 63, 64, 65, 130, 257)
VARLEN_LENS = (1, 64, 65, 3, 130)


@dataclass
class Case:
    """Inputs of one call; `kwargs` are the remaining keyword arguments of the public ops."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    def args(self):
        return self.q, self.k, self.v, self.g, self.beta


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/inf in `out` give inf (never a pass)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def oracle(case: Case):
    """Token-by-token float64 run on the same (already rounded) inputs: (o, final_state)."""
    kw = dict(case.kwargs)
    h0 = kw.get("initial_state")
    return recurrent_gated_delta_rule(
        *(t.double() for t in case.args()),
        scale=kw.get("scale") or case.q.shape[-1] ** -0.5,
        initial_state=None if h0 is None else h0.double(),
        output_final_state=True,
        cu_seqlens=kw.get("cu_seqlens"),
        use_qk_l2norm=kw.get("use_qk_l2norm_in_kernel", False),
    )


def _gen(seed: int, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def make_case(kind: str, dtype=torch.float32, device="cpu", seed: int = 0, seq_len: int = 130,
              batch: int = 2, heads: int = 2, value_heads: int | None = None, dk: int = 32, dv: int | None = None,
              ) -> Case:
    """Build one case. `kind` is one of CASE_KINDS; fp32 data is drawn, then rounded to `dtype`
    (g and beta stay float32, as models feed them)."""
    gen = _gen(seed, "cpu")  # draw on the CPU so every device sees the same numbers
    hv = value_heads or heads
    dv = dv or dk
    b, t_len = batch, seq_len
    kwargs: dict = {}

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    q = randn(b, t_len, heads, dk)
    k = F.normalize(randn(b, t_len, heads, dk), dim=-1)
    v = randn(b, t_len, hv, dv)
    g = -rand(b, t_len, hv) * 0.5  # moderate decay
    beta = rand(b, t_len, hv)
    if kind == "random":
        pass
    elif kind == "l2norm_in_kernel":
        k = randn(b, t_len, heads, dk) * 3.0  # unnormalised: the op normalises q and k
        kwargs["use_qk_l2norm_in_kernel"] = True
    elif kind == "near_identical_keys":
        # Repetitive text: every key ~ one unit vector; beta ~ 1, no decay (seed 000).
        base = F.normalize(randn(1, 1, heads, dk), dim=-1)
        k = F.normalize(base + 1e-3 * randn(b, t_len, heads, dk), dim=-1)
        beta = torch.full((b, t_len, hv), 0.999)
        g = torch.zeros(b, t_len, hv)
    elif kind == "cyclic_keys":
        dirs = F.normalize(randn(3, heads, dk), dim=-1)
        k = dirs[torch.arange(t_len) % 3].unsqueeze(0).expand(b, -1, -1, -1).clone()
        beta = torch.ones(b, t_len, hv)
    elif kind == "strong_decay":
        g = -rand(b, t_len, hv) * 30.0  # down to -30 per token (seed 002's overflow)
    elif kind == "zero_decay":
        g = torch.zeros(b, t_len, hv)
    elif kind == "beta_0_2":
        beta = rand(b, t_len, hv) * 2.0
        beta[rand(b, t_len, hv) < 0.25] = 0.0  # exact zeros
    elif kind == "gva_k_ne_v":
        pass  # shapes come from the arguments (the case table sets HV = 2H, K != V)
    elif kind == "large_initial_state":
        kwargs["initial_state"] = 100.0 * randn(b, hv, dk, dv)
    elif kind == "learned_values":
        # v = W k (one fixed W per value head): the state learns W, so the residual V - K S falls
        # toward 0 and a rounding of K S is large against it; no decay, and the last eighth of
        # the tokens make no update (beta = 0), so nothing after the first 7/8 corrects the state
        # (NOTES.md v5.16: one bf16 product of the maps' K S passes every other kind, not this one)
        w = randn(hv, dk, dv)
        v = torch.einsum("bthk,hkv->bthv", k.repeat_interleave(hv // heads, dim=2), w).contiguous()
        g = torch.zeros(b, t_len, hv)
        beta = 0.5 + 0.5 * rand(b, t_len, hv)
        beta[:, t_len - t_len // 8:] = 0.0
    elif kind == "varlen":
        lens = VARLEN_LENS
        total = sum(lens)
        q, v = randn(1, total, heads, dk), randn(1, total, hv, dv)
        k = F.normalize(randn(1, total, heads, dk), dim=-1)
        g, beta = -rand(1, total, hv) * 0.5, rand(1, total, hv)
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        kwargs["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int64, device=device)
        kwargs["initial_state"] = randn(len(lens), hv, dk, dv)
    else:
        raise ValueError(f"unknown case kind {kind!r}; expected one of {CASE_KINDS}")
    if "initial_state" in kwargs:
        init = kwargs["initial_state"].to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        kwargs["initial_state"] = init
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    g, beta = (x.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32) for x in (g, beta))
    name = f"{kind}/T={q.shape[1]}/{str(dtype).removeprefix('torch.')}"
    return Case(name, q, k, v, g, beta, kwargs)


def raw_norms_case(case: Case, seed: int) -> Case:
    """The case with q's and k's rows scaled by 10^U(-2, 2), 2% of them exactly zero, and
    use_qk_l2norm_in_kernel: the op's normalisation gives back the kind's directions (near-
    identical keys stay near-identical), over four decades of norms and through eps."""
    gen = torch.Generator().manual_seed(seed)
    scaled = []
    for x in (case.q, case.k):
        rows = x.shape[:3]
        factor = 10.0 ** (4.0 * torch.rand(*rows, generator=gen) - 2.0)
        factor[torch.rand(*rows, generator=gen) < 0.02] = 0.0
        scaled.append((x.float() * factor[..., None].to(x.device)).to(x.dtype))
    kwargs = dict(case.kwargs, use_qk_l2norm_in_kernel=True)
    return Case(case.name + "/l2norm", scaled[0], scaled[1], case.v, case.g, case.beta, kwargs)


CASE_KINDS = ("random", "l2norm_in_kernel", "near_identical_keys", "cyclic_keys", "strong_decay", "zero_decay",
              "beta_0_2", "gva_k_ne_v", "large_initial_state", "varlen", "learned_values")


def parity_cases(dtypes=(torch.float32, torch.bfloat16), device="cpu", seed: int = 0,
                 seq_lens=SEQ_LENS, dk: int = 32) -> list[Case]:
    """The parity table: random inputs at every length, every adversarial kind at T = 130."""
    cases = []
    for dtype in dtypes:
        for t_len in seq_lens:
            cases.append(make_case("random", dtype, device, seed + t_len, seq_len=t_len, dk=dk))
        for i, kind in enumerate(CASE_KINDS[1:]):
            extra = dict(heads=2, value_heads=4, dv=dk + 16) if kind == "gva_k_ne_v" else {}
            cases.append(make_case(kind, dtype, device, seed + 1000 + i, seq_len=130, dk=dk, **extra))
    return cases
