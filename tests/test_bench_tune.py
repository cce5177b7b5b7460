"""The Triton attention tile sweep (dlfast.bench.tune) on tiny shapes: it must time the table
entry and the candidates, report a tile that breaks the result, and leave the table as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import skip_reason

from dlfast.bench import tune

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.triton
@pytest.mark.skipif(skip_reason("triton", DEVICE) is not None, reason=str(skip_reason("triton", DEVICE)))
@pytest.mark.parametrize("kernel", tune.KERNELS)
def test_sweep_times_the_table_entry_and_the_candidates(kernel):
    from dlfast.triton_kernels.attention import _CONFIGS

    before = dict(_CONFIGS)
    small = (16, 16, 4, 1)
    device = torch.device(DEVICE)
    rows = tune.tune_entry(kernel, 16, torch.float32, device, 40, 80, 32, [small], quick=True)
    assert _CONFIGS == before
    assert [tuple(r["config"]) for r in rows] == [tuple(rows[0]["table"]), small]
    for row in rows:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["causal_ms"] > 0
        assert row["relative_error"] < tune.TOLERANCE[torch.float32]
    assert tune.best(rows) in rows


def test_a_tile_that_breaks_the_result_is_never_chosen():
    rows = [
        {"config": [64, 64, 4, 2], "ms": 2.0, "causal_ms": 1.0},
        {"config": [128, 64, 8, 3], "ms": 0.5, "causal_ms": 0.5, "error": "differs"},
    ]
    assert tune.best(rows) is rows[0]
    assert tune.best(rows[1:]) is None


@pytest.mark.parametrize("kernel", tune.KERNELS)
def test_candidates_are_valid_tiles(kernel):
    for fp32 in (False, True):
        configs = tune.candidates(kernel, fp32)
        assert len(set(configs)) == len(configs) > 0
        for m, n, warps, stages in configs:
            assert m >= 16 and n >= 16 and m & (m - 1) == 0 and n & (n - 1) == 0
            assert warps in (4, 8) and stages >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="tells apart a machine with no GPU")
def test_the_sweep_refuses_to_run_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        tune.main(["--kernel", "fwd"])
    assert "none is visible" in capsys.readouterr().err
