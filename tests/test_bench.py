"""The benchmark harness's own logic, on the CPU."""

import json
import sys

import pytest
import torch

from flashdelta import bench, cli


def test_prefill_cost_by_hand():
    n_bytes, flops = bench.prefill_cost([8192], 16, 16, 128, 128, 2)
    per_token = (2 * 16 * 128 + 2 * 16 * 128) * 2 + 2 * 16 * 4  # q, k, v, o in bf16; g, beta fp32
    assert n_bytes == 8192 * per_token + 2 * 16 * 128 * 128 * 4  # + fp32 state in and out
    per_chunk = flops / (128 * 16)
    assert abs(per_chunk - 11.72e6) / 11.72e6 < 2e-3  # shared/design/gdn-math.md: ~11.7 MFLOP
    # a partial last chunk costs a whole chunk; varlen sums its sequences
    assert bench.prefill_cost([65], 1, 1, 64, 64, 2)[1] == 2 * bench.prefill_cost([64], 1, 1, 64, 64, 2)[1]


def test_decode_cost_by_hand():
    n_bytes, flops = bench.decode_cost(256, 1, 16, 32, 128, 128, 2, 4)
    assert n_bytes == 2 * 256 * 32 * 128 * 128 * 4 + 256 * ((2 * 16 * 128 + 2 * 32 * 128) * 2 + 2 * 32 * 4)
    assert flops == 256 * 32 * 7 * 128 * 128


def test_quick_run_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "ceilings", "results"}
    assert {"date", "torch", "triton", "device", "peers", "peers_missing"} <= set(data["meta"])
    assert data["ceilings"]["copy_bandwidth_GBps"] > 0 and data["ceilings"]["matmul_TFLOPs"] > 0
    assert len(data["results"]) == 3
    for r in data["results"]:
        assert {"impl", "label", "time_ms", "floor_ms", "frac_floor", "rel_err_o", "bytes", "flops"} <= set(r)
        assert 0 < r["frac_floor"] and r["rel_err_o"] < 1e-5  # the torch path against the fp64 loop
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "speed-up vs peers" in capsys.readouterr().out


def test_missing_peer_is_reported_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # import fla -> ImportError
    monkeypatch.setitem(sys.modules, "flash_qla", None)
    impls, missing = bench.peer_impls(torch.device("cuda"))
    assert impls == []
    assert any(line.startswith("fla ") for line in missing) and any("flashqla" in line for line in missing)


def test_warm_up_calls_each_prefill_once_per_head_configuration(capsys):
    calls = []
    impl = bench.Impl("spy", False, prefill=lambda a, kw: calls.append((a[0].shape, "cu_seqlens" in kw)))
    shapes = [bench.Shape("prefill", "a", [300], 2, 4, 16, 16, dtype="float32"),
              bench.Shape("prefill", "b", [500], 2, 4, 16, 16, dtype="float32"),  # same configuration
              bench.Shape("prefill", "v", [100, 200], 2, 4, 16, 16, dtype="float32", varlen=True),
              bench.Shape("decode", "d", [1] * 4, 2, 4, 16, 16, dtype="float32")]  # not a prefill
    assert bench.warm_up(shapes, [impl], torch.device("cpu")) >= 0
    assert sorted(varlen for _, varlen in calls) == [False, True]
    assert all(shape[2] == 2 and shape[3] == 16 for shape, _ in calls)
    assert len([line for line in capsys.readouterr().err.splitlines() if line.startswith("warm-up h2/4")]) == 2


def test_short_prefill_rows_also_timed_as_graphs():
    """The GPU suite's short prefill rows come twice: eager (host time included) and as a
    CUDA-graph replay (kernels only), with distinct labels; the long rows eager only."""
    shapes = bench.gpu_shapes("prefill", quick=False)
    labels = [s.label for s in shapes]
    assert len(labels) == len(set(labels))
    graphs = [s for s in shapes if s.graph]
    assert {s.label for s in graphs} == {f"{n} h16/16 {g} graph" for n in ("1x4K", "1x8K") for g in ("strong", "weak")}
    assert all(s.total_tokens <= 8192 for s in graphs)
    assert all(f"{s.name} h16/16 {s.gate}" in labels for s in graphs)  # the same row eager


def test_select_shapes_by_word_or_exact_label():
    """--shapes: a word picks every label containing it (the l2norm and graph rows too); "=label"
    picks that row alone."""
    shapes = bench.gpu_shapes("prefill", quick=False)
    by_word = {s.label for s in bench.select_shapes(shapes, "1x32K h16/16 strong")}
    assert by_word == {"1x32K h16/16 strong", "1x32K h16/16 strong l2norm"}
    exact = bench.select_shapes(shapes, "=1x32K h16/16 strong,=8x4K h16/32 weak")
    assert [s.label for s in exact] == ["1x32K h16/16 strong", "8x4K h16/32 weak"]
    assert bench.select_shapes(shapes, "=1x32K") == []
