"""The GPU benchmark's code path, on the CPU: every mode runs, equals eager, and no-CUDA is one line."""

import pytest
import torch
import torch._dynamo

from ditcache.bench.gpu import MODES, NEEDS_CUDA, check_device, gpu_table, time_modes, GpuRow
from ditcache.cli.main import main
from ditcache.sampling.generate import SampleConfig

from ..correctors.conftest import tiny_loaded


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_every_mode_runs_each_cache_and_matches_eager_images():
    config = SampleConfig(num_samples=2, batch_size=2, steps=4, cfg_scale=1.5)
    specs = ("bare", "fora:interval=2", "fora:interval=2+goc", "rule:steps=1/3")
    rows = time_modes(tiny_loaded(), config, specs, MODES, repeats=1, device="cpu", backend="aot_eager",
                      progress=False)
    assert [(mode, row.spec) for mode, row, _ in rows] == [(m, s) for m in MODES for s in specs]
    for mode, row, diff in rows:
        assert diff == 0  # the same images as the eager engine
        expected = {"bare": 1.0, "fora:interval=2": 3 / 4, "fora:interval=2+goc": 3 / 4, "rule:steps=1/3": 2 / 4}[row.spec]
        assert row.compute_fraction == pytest.approx(expected)  # counted from the plan when compiled
    assert rows[0][1].speedup == 1.0  # the bare eager run is the reference
    table = gpu_table([GpuRow(4, "float32", m, r, d) for m, r, d in rows], 1)
    assert table.count("\n| 4 | float32 |") == len(rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_cuda_the_gpu_preset_fails_with_one_line(capsys):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_device("cuda")
    check_device("cpu")
    assert main(["bench", "--preset", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and NEEDS_CUDA in err


def test_a_mode_that_fails_is_left_out_and_named(monkeypatch, capsys):
    import ditcache.bench.gpu as gpu

    real = gpu.mode_runner

    def runner(loaded, config, spec, mode, device, backend="inductor"):
        if mode == "graphs":
            def fail():
                raise RuntimeError("no capture here")
            return fail
        return real(loaded, config, spec, mode, device, backend)

    monkeypatch.setattr(gpu, "mode_runner", runner)
    config = SampleConfig(num_samples=1, batch_size=1, steps=2, cfg_scale=1.5)
    rows = gpu.time_modes(tiny_loaded(), config, ("bare",), MODES, repeats=1, device="cpu", backend="eager",
                          progress=False)
    assert [mode for mode, _, _ in rows] == ["eager", "compiled"]
    assert "graphs bare failed, left out of the table: RuntimeError: no capture here" in capsys.readouterr().out
