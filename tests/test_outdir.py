"""The output-folder rule: lock, settings, --overwrite, rollback when nothing was made."""

import json
import os
import socket
import subprocess
import sys

import pytest

from ditcache.outdir import FolderInUse, claim, lock_path


def test_other_settings_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    with claim(out, {"seed": 0, "labels": (1, 2)}):
        (out / "result.txt").write_text("kept")
    with claim(out, {"seed": 0, "labels": (1, 2)}):  # same settings (tuples read back as lists): reused
        assert (out / "result.txt").read_text() == "kept"
    with pytest.raises(ValueError, match=r"holds a run with other settings \(seed\); pass --overwrite"):
        with claim(out, {"seed": 1, "labels": (1, 2)}):
            pass
    assert (out / "result.txt").read_text() == "kept"  # nothing lost by the refusal
    with claim(out, {"seed": 1, "labels": (1, 2)}, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    assert json.loads((out / "run.json").read_text())["seed"] == 1


def test_failure_before_any_result_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="bad prior"):
        with claim(out, {"seed": 0}):
            raise ValueError("bad prior")
    assert not out.exists() and not lock_path(out).exists()
    with claim(out, {"seed": 1}):  # the corrected command is not blocked
        pass


def test_live_lock_refused_dead_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock_path(out).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "then"}))
        with pytest.raises(FolderInUse, match=f"is in use by pid {holder.pid} on {socket.gethostname()}"):
            with claim(out, {"seed": 0}):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim(out, {"seed": 0}):  # its owner is gone now
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert f"took over {lock_path(out)} left by pid {holder.pid}" in capsys.readouterr().err
    assert not lock_path(out).exists()


def test_temporaries_of_a_crashed_write_are_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".report.json.abc.tmp.json").write_text("{")
    with claim(out, None):
        assert not (out / ".report.json.abc.tmp.json").exists()
