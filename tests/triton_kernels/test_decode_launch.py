"""The decode kernel's launch rule (the choices measured on the GPU, NOTES.md)."""

from flashdelta.triton import decode as td


def test_small_grids_take_narrow_column_blocks(monkeypatch):
    """BV 32 only where the BV 64 grid leaves SMs idle (batch 1 at 32 value heads on 132 SMs);
    BV 64 from batch 16 on; an explicit TUNING choice wins; each call gets its own dict."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert td.launch_config(128, 128, 1, 32, 132)["BV"] == 32
    assert td.launch_config(128, 128, 2, 32, 132)["BV"] == 32  # 128 programs at BV 64: one per SM at most
    assert td.launch_config(128, 128, 16, 32, 132)["BV"] == 64
    assert td.launch_config(128, 128)["BV"] == 64  # no grid given (the offline compile)
    assert td.launch_config(256, 256, 64, 32, 132)["BV"] == 32  # K = 256: 32 at any grid
    monkeypatch.setitem(td.TUNING, "block_v", 16)
    cfg = td.launch_config(128, 128, 1, 32, 132)
    assert cfg["BV"] == 16
    cfg["BV"] = 0  # the caller's copy, not the cached rule
    assert td.launch_config(128, 128, 1, 32, 132)["BV"] == 16
