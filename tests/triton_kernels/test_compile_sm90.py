"""Every kernel, compiled for sm_90 offline (no GPU needed) with the host's launch parameters,
fits in Hopper's shared memory. fp32 operands at K = V = 128 once needed 296 KB (limit 227 KB)
and only a GPU run showed it."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SHARED_LIMIT = 232448  # bytes one block may use on Hopper (227 KB)


def _kernel_rows(code: str) -> dict:
    """{kernel name: its JSON row} from `code` run in a fresh interpreter, outside TRITON_INTERPRET
    (the compile targets sm_90 offline)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return {r["kernel"]: r for r in map(json.loads, res.stdout.splitlines())}


def test_all_kernels_fit_in_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "flashdelta.triton.aot", "--dims", "128,256"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    # per dim: 7 prefill kernels (inverse with and without the map bounds, warm start, plan choice,
    # output and map passes, chain) per dtype (bf16, fp32), the 3 that differ with the in-kernel L2 norm
    # (inverse, output and map passes) per dtype (bf16, fp16, fp32: bf16 at K = 256 needed 333 KB
    # before the norm was folded, and only a GPU run showed it), 2 token-loop kernels; + the Gluon
    # passes (output, lead: rows may be empty, map, the transposed output and map passes) and the Gluon
    # inverse with and without the bounds (bf16, K = 128); the output, lead and transposed map passes
    # and the inverse with the folded L2 norm; at K = 256 the Gluon output, lead and map passes and the
    # output pass with the folded norm, and the Gluon inverse's three. (V = 512 at K = 256 takes the same
    # tiles: BV = 32.)
    assert len(rows) == 2 * (2 * 7 + 3 * 3 + 2) + 7 + 4 + 4 + 3
    too_big = [r for r in rows if r["shared"] > SHARED_LIMIT]
    assert not too_big, too_big
    # the prefill's tensor-core products are Hopper's wgmma, not the older mma.sync path
    assert all(r["wgmma"] > 0 for r in rows if r["kernel"] in ("output pass", "gluon output pass", "gluon map pass",
                                                                  "gluon transposed output pass",
                                                                  "gluon transposed map pass", "gluon inverse",
                                                                  "gluon output pass 256", "gluon map pass 256"))
    assert [r["dim"] for r in rows if r["kernel"] == "gluon output pass"] == [128]
    assert [r["dim"] for r in rows if r["kernel"] == "gluon output pass 256"] == [256]


def test_gluon_passes_fit_two_per_sm_without_hoisted_descriptors():
    """The Gluon passes are sized for two programs per SM (chunk_sm90.PROGRAMS_PER_SM): shared
    memory for two blocks, and at most 255 registers for 4 warps. Their loop takes every shared
    operand through an opaque index so the wgmma descriptors are rebuilt where used: held as
    loop invariants they spilled 376 B per thread and cost 30% (NOTES.md v4.7), which is what
    the stack bound catches (a few loop invariants spill by design: 80 B, timed in NOTES.md v4.9)."""
    from flashdelta.triton import chunk_sm90

    assert chunk_sm90.PROGRAMS_PER_SM == 2 and chunk_sm90.NUM_WARPS == 4
    rows = _kernel_rows("import json; from flashdelta.triton import aot\n"
                        "for name, k in aot.sm90_kernels():\n"
                        "    print(json.dumps(dict(kernel=name, shared=k.metadata.shared, **aot.registers(k))))")
    for name in ("gluon inverse", "gluon inverse, map bounds", "gluon inverse, map bounds, l2norm"):
        rows.pop(name)  # (test_gluon_inverse_fits_four_per_sm)
    assert set(rows) == {"gluon output pass", "gluon lead pass", "gluon map pass", "gluon transposed output pass",
                         "gluon transposed map pass", "gluon output pass, l2norm", "gluon lead pass, l2norm",
                         "gluon transposed map pass, l2norm"}
    for r in rows.values():
        assert 2 * (r["shared"] + 1024) <= 233472, r  # 228 KB per SM, 1 KB reserved per block
        if "registers" in r:  # cuobjdump ships with Triton's NVIDIA backend
            assert r["registers"] <= 255, r
    if "stack" in rows["gluon map pass"]:
        assert rows["gluon map pass"]["stack"] == 0, rows
        # the transposed map pass (the default since v5.6): 239 registers, no spill, 107 KB
        assert rows["gluon transposed map pass"]["stack"] == 0, rows
        assert rows["gluon transposed map pass, l2norm"]["stack"] == 0, rows  # (241 registers)
        # 56-64 B in v4.8; 80 B since v4.9 (gates as exp2: -136 instructions, the same time on the H100);
        # 48 / 56 B (output / lead) in v5.9. The folded L2 norm: n_k's [64] load per step, and
        # 1 / |q_t| summed from q's tile while the last products run (v5.9): 56 / 56 B (summed
        # right after Q K^T: 64 / 64 B; loaded from gcum: 56 / 72 B)
        for name in ("gluon output pass", "gluon lead pass"):
            assert rows[name]["stack"] <= 96 and rows[name + ", l2norm"]["stack"] <= rows[name]["stack"] + 8, rows
        # the transposed output pass (off by default) holds its pairs as register operands: 224 B
        # in v5.2, 16 B since v5.6 re-reads its column gates from shared memory (NOTES.md)
        assert rows["gluon transposed output pass"]["stack"] <= 64, rows


def test_gluon_passes_k256_one_per_sm_without_spill():
    """At K = 256 the Gluon output, lead and map passes (column blocks of 32: the state's fp32
    tile is 64 registers) compile without spill (the Triton output pass there: 192 B of spill at
    202 KB) and fit one program per SM, as the partition rule is told (chunk_sm90.PROGRAMS_PER_SM_256:
    the rule at two programs per SM split 1x32K 16-head calls in two, 1.6x slower under weak gates).
    The Gluon inverse there fits two per SM (inverse_sm90.PROGRAMS_PER_SM_256, its waves' model)
    under its 128-register cap."""
    from flashdelta.triton import chunk_sm90, inverse_sm90

    assert chunk_sm90.PROGRAMS_PER_SM_256 == 1 and chunk_sm90.BLOCK_V_256 == 32
    rows = _kernel_rows("import json; from flashdelta.triton import aot\n"
                        "for name, k in aot.sm90_kernels_256():\n"
                        "    print(json.dumps(dict(kernel=name, shared=k.metadata.shared, **aot.registers(k))))")
    inverses = {"gluon inverse 256", "gluon inverse 256, map bounds", "gluon inverse 256, map bounds, l2norm"}
    assert set(rows) == {"gluon output pass 256", "gluon lead pass 256", "gluon output pass 256, l2norm",
                         "gluon map pass 256"} | inverses
    for name, r in rows.items():
        per_sm = inverse_sm90.PROGRAMS_PER_SM_256 if name in inverses else chunk_sm90.PROGRAMS_PER_SM_256
        assert 233472 // (r["shared"] + 1024) == per_sm, r  # 228 KB per SM, 1 KB reserved per block
        if "registers" in r:
            # (the folded norm's 1 / |q_t| load from gcum: 8 B; the inverse's bounds: 8 B; with the
            # norm the inverse also sums q's norms at K = 256: 16 B, as at K = 128 where it does)
            assert r["registers"] <= (inverse_sm90.MAX_REGISTERS if name in inverses else 255), r
            limit = 16 if name == "gluon inverse 256, map bounds, l2norm" else 8
            assert r["stack"] <= (limit if "l2norm" in name or "bounds" in name else 0), r


def test_gluon_inverse_fits_four_per_sm():
    """The Gluon inverse (inverse_sm90.py) is latency-bound per program, so several must share an
    SM: four fit (v5.3: 107 and 127 registers, 42 KB; v5.7's chunk loop: 128 registers under its
    maxnreg cap, without spill, 54 KB with k's second tile). Its own products are mma.sync, its
    gram one wgmma."""
    from flashdelta.triton import chunk as tc
    from flashdelta.triton import inverse_sm90

    assert inverse_sm90.NUM_WARPS == 4
    rows = _kernel_rows("import json; from flashdelta.triton import aot\n"
                        "for name, k in aot.sm90_kernels():\n"
                        "    if 'inverse' in name:\n"
                        "        ptx = k.asm['ptx']\n"
                        "        print(json.dumps(dict(kernel=name, shared=k.metadata.shared,\n"
                        "                              ptx=ptx.count('mma.sync'), wgmma=ptx.count('wgmma.mma_async'),\n"
                        "                              **aot.registers(k))))")
    assert set(rows) == {"gluon inverse", "gluon inverse, map bounds", "gluon inverse, map bounds, l2norm"}
    for name, r in rows.items():
        assert 4 * (r["shared"] + 1024) <= 233472, r
        assert r["wgmma"] > 0 and r["ptx"] > 0, r
        if "registers" in r:  # 4 warps x 4 programs x 128 = 65536
            # with the folded L2 norm (v5.8), k's row sums at the top of the chunk: no spill; with
            # q's there too (TUNING["gluon_q_norms"] "inverse"), 16 B (k's from the gram's diagonal: 80 B)
            q_norms = "l2norm" in name and tc.TUNING["gluon_q_norms"] == "inverse"
            assert r["registers"] <= 128 and r["stack"] <= (16 if q_norms else 0), r


def test_gluon_kernels_fp16_fit_as_bf16():
    """fp16 inputs take the same Gluon kernels (chunk_sm90 F16: fp16 q, k, v, o tiles, the state's
    and U~'s pairs in fp16 scaled per tile): the shared memory of bf16 plus the 512 B where the
    scales' warp maxima meet, so the same programs per SM that the partition rule and the
    inverse's waves assume, at most 255 registers (the inverse under its cap). The scales cost
    registers: the K = 128 output and lead passes spill 80-88 B (152 B with the folded norm) where
    bf16's spill 48-56 B, the K = 256 ones 0-16 B; the map passes none (NOTES.md v5.14; gl.max's
    reductions spilled 112-232 B and 64-96 B, v5.13). The bounds catch the failure the bf16 test
    guards against (hoisted descriptors: 376 B)."""
    from flashdelta.triton import chunk_sm90, inverse_sm90

    code = ("import json; from flashdelta.triton import aot\n"
            "for io in ('bf16', 'fp16'):\n"
            "    for gen in (aot.sm90_kernels(io=io), aot.sm90_kernels_256(io=io)):\n"
            "        for name, k in gen:\n"
            "            if 'transposed' not in name:\n"
            "                print(json.dumps(dict(kernel=io + ' ' + name, shared=k.metadata.shared,\n"
            "                                      **aot.registers(k))))")
    rows = _kernel_rows(code)
    fp16 = {name[5:]: r for name, r in rows.items() if name.startswith("fp16 ")}
    bf16 = {name[5:]: r for name, r in rows.items() if name.startswith("bf16 ")}
    # (the fp16 map pass at K = 128 is the non-transposed one, with the norm too: bf16 takes the transposed one)
    assert set(fp16) == set(bf16) | {"gluon map pass, l2norm"}
    for name, r in fp16.items():
        if name in bf16:
            assert 0 <= r["shared"] - bf16[name]["shared"] <= (0 if "inverse" in name else 512), (r, bf16[name])
        inverse = "inverse" in name
        if inverse:
            per_sm = inverse_sm90.PROGRAMS_PER_SM_256 if "256" in name else inverse_sm90.PROGRAMS_PER_SM
        else:
            per_sm = chunk_sm90.PROGRAMS_PER_SM_256 if "256" in name else chunk_sm90.PROGRAMS_PER_SM
        assert 233472 // (r["shared"] + 1024) >= per_sm, r
        if "registers" in r:
            assert r["registers"] <= (inverse_sm90.MAX_REGISTERS if inverse else 255), r
            if inverse:
                assert r["stack"] == bf16[name]["stack"], (r, bf16[name])
            elif "map pass" in name:
                assert r["stack"] == 0, r
            else:
                assert r["stack"] <= (32 if "256" in name else 192), r


def _check_single_levels(setup: str, compile_level: str, default_name: str, restore: str = ""):
    """Compile a pass at SINGLE levels 0-3 (`setup` once, then `compile_level` per level `lv`: it sets
    `k`) and the default launch's kernel `default_name` (after `restore`), and check that each level
    takes away products and nothing else: fewer wgmma than the level before, no more shared memory,
    the two programs per SM of the split pass, and level 0's PTX the default launch's."""
    from flashdelta.triton import chunk_sm90

    body = "'\\n'.join(x for x in ptx.splitlines() if '.loc' not in x and '.file' not in x)"
    code = ("import json; from flashdelta.triton import aot, chunk as tc, chunk_sm90 as g\n" + setup +
            "for lv in (0, 1, 2, 3):\n" + compile_level +
            "    ptx = k.asm['ptx']\n"
            f"    print(json.dumps(dict(kernel=lv, shared=k.metadata.shared, wgmma=ptx.count('wgmma.mma_async'),\n"
            f"                          body=hash({body}), **aot.registers(k))))\n" + restore +
            "for name, k in aot.sm90_kernels():\n"
            f"    if name == {default_name!r}:\n"
            "        ptx = k.asm['ptx']\n"
            f"        print(json.dumps(dict(kernel='default', body=hash({body}))))\n")
    rows = _kernel_rows(code)
    levels = [rows[lv] for lv in (0, 1, 2, 3)]
    assert levels[0]["body"] == rows["default"]["body"]
    for lo, hi in zip(levels[1:], levels[:-1]):  # (PTX wgmma instructions: one per 16-deep slice of a product)
        assert lo["wgmma"] < hi["wgmma"], (lo, hi)
        assert lo["shared"] <= hi["shared"], (lo, hi)
    for r in levels:
        assert 233472 // (r["shared"] + 1024) >= chunk_sm90.PROGRAMS_PER_SM, r
        if "registers" in r:
            assert r["registers"] <= 255 and r["stack"] <= 64, r


def test_gluon_single_product_levels():
    """TUNING["gluon_single"] (chunk_sm90 SINGLE, an experiment: NOTES.md v5.15) takes away the
    products it names and nothing else (`_check_single_levels`)."""
    _check_single_levels(
        "",
        "    tc.TUNING['gluon_split_qs'] = lv == 0\n"
        "    mode = dict(MAP=False, HAS_STATE_IN=True, STORE_FINAL=True, WARM=False, MAY_BE_EMPTY=False,\n"
        "                warm_ptr=None, O_TMA=True, WIDE_KS=lv == 0)\n"
        "    if lv:\n"
        "        mode['SINGLE'] = lv\n"
        "    k = aot.compile_gluon(g._recurrence_kernel, mode)\n",
        "gluon output pass", restore="tc.TUNING['gluon_split_qs'] = True\n")


def test_gluon_map_single_product_levels():
    """TUNING["gluon_map_single"] (chunk_sm90._map_kernel_t SINGLE, an experiment: NOTES.md v5.16) takes
    away the products it names and nothing else (`_check_single_levels`; the split pass issues 7
    products per step: 2 K S, 3 X T_u, 2 U~ K; levels 1-3: 6, 5, 3)."""
    _check_single_levels(
        "warm = tc.TUNING['skip_negligible_maps']\n",
        "    mode = dict(HV=32, V=128, PACKED_SPLIT=tc.TUNING['gluon_packed_split'], WARM=warm, L2NORM=False,\n"
        "                **({} if warm else {'warm_ptr': None}))\n"
        "    if lv:\n"
        "        mode['SINGLE'] = lv\n"
        "    k = aot.compile_gluon(g._map_kernel_t, mode, common=False)\n",
        "gluon transposed map pass")
