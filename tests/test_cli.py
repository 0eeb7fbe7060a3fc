import subprocess
import sys

import flashdelta.cli as cli


def test_check_prints_table_and_passes(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "near_identical_keys" in out and "rel_err(o)" in out
    assert " 0 failed" in out.splitlines()[-1]


def test_check_fails_on_a_wrong_path(monkeypatch, capsys):
    """The table must be able to fail: break one path and see a non-zero exit."""
    real = cli.PATHS["chunk"]
    monkeypatch.setitem(cli.PATHS, "chunk", lambda *a, **k: (lambda o, s: (o * 1.01, s))(*real(*a, **k)))
    assert cli.main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "flashdelta", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "check" in res.stdout
