"""Data-parallel training with torch.distributed: 2 gloo processes on CPU.

Each spawn costs a few seconds of imports, so one module-scoped launch does the training
runs that several tests check.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from click.testing import CliRunner
from pyro.infer import Trace_ELBO
from torch import nn

from ppl_vae import pipeline, runs
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.data.datasets import Dataset
from ppl_vae.inference import distributed
from ppl_vae.inference.training import train
from ppl_vae.models.vae import data_plate

NUM_DATA, DIM, LATENT, BATCH, EPOCHS, LR = 60, 4, 2, 16, 3, 5e-4  # last global batch: 12 points


class DeltaPair(nn.Module):
    """A model/guide pair whose guide is a point mass z = enc(x): the ELBO, log p(x, enc(x)),
    has no Monte Carlo noise, so a 2-rank run must equal the single-process run exactly."""

    num_classes = None

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(DIM, LATENT)
        self.dec = nn.Linear(LATENT, DIM)

    def model(self, x, num_data=None, kl_weight=1.0):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x, num_data=None, kl_weight=1.0):
        with data_plate(x, num_data):
            pyro.sample("z", dist.Delta(self.enc(x), event_dim=1))


def _delta_data() -> Dataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_DATA + 20, DIM, generator=g) @ torch.randn(DIM, DIM, generator=g)
    return Dataset("synthetic", x[:NUM_DATA], x[NUM_DATA:])


def _delta_config() -> TrainConfig:
    return TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, optimizer="sgd", device="cpu", seed=3)


def _digits_config(epochs: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model="gaussian_mlp", hidden_dim=32, latent_dim=2),
        data=DataConfig(train_size=400),
        train=TrainConfig(epochs=epochs, batch_size=50, lr=3e-3, device="cpu", seed=0),
    )


def _ranks_worker(tmp: str) -> dict:
    """One rank: the exact-arithmetic run, then digits fit (2 epochs), and fit 1 + resume to 2."""
    tmp = Path(tmp)
    with distributed.process_group("cpu", timeout_s=60) as ctx:
        torch.manual_seed(0)
        pair = DeltaPair()
        history = train(pair, _delta_data(), _delta_config(), progress=False, dist=ctx)
        out = {
            "delta_params": {k: v.clone() for k, v in pair.state_dict().items()},
            "delta_loss": history.train_loss.values,
            "delta_elbo": history.train_elbo.values,
        }
        # as under torchrun, each process calls fit; rank 1 gets a path of its own: rank 0's choice
        # is broadcast, so rank 1 must not create or write its own
        whole = pipeline.fit(_digits_config(2), tmp / ("whole" if ctx.rank == 0 else "whole-rank1"), progress=False)
        pipeline.fit(_digits_config(1), tmp / "resumed", progress=False)
        resumed = pipeline.resume(tmp / "resumed", epochs=2, progress=False)
        # QA: an evaluated set smaller than the number of ranks (1 train-ELBO point, a 1-point
        # validation set) gave one rank an empty shard and stopped the run (torch.cat of nothing)
        tiny = RunConfig(
            model=ModelConfig(model="gaussian_mlp", hidden_dim=8, latent_dim=2),
            data=DataConfig(train_size=10),
            train=TrainConfig(epochs=1, batch_size=2, device="cpu", train_eval_size=1, val_fraction=0.1),
        )
        small = pipeline.fit(tiny, tmp / ("tiny" if ctx.rank == 0 else "tiny-rank1"), progress=False)
        out["tiny_elbos"] = [float(small.history.train_elbo[0]), float(small.history.val_elbo[0])]
        out["digits_elbo"] = whole.history.train_elbo.values
        out["whole_params"] = {k: v.clone() for k, v in whole.vae.state_dict().items()}
        out["resumed_params"] = {k: v.clone() for k, v in resumed.vae.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, distributed.launch(_ranks_worker, (str(tmp),), nproc=2)


def _single_process_delta():
    """The reference: one process, SGD on global batches drawn as DistributedSampler orders them."""
    torch.manual_seed(0)
    pair, data, config = DeltaPair(), _delta_data(), _delta_config()
    optimizer = torch.optim.SGD(pair.parameters(), lr=LR)
    elbo = Trace_ELBO(max_plate_nesting=1)
    losses = []
    for epoch in range(EPOCHS):
        order = torch.randperm(NUM_DATA, generator=torch.Generator().manual_seed(config.seed + epoch))
        total = 0.0
        for b in range(math.ceil(NUM_DATA / BATCH)):
            loss = elbo.differentiable_loss(
                pair.model, pair.guide, data.train[order[b * BATCH : (b + 1) * BATCH]], num_data=NUM_DATA
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / (math.ceil(NUM_DATA / BATCH) * NUM_DATA))
    return pair, losses


def test_parameters_identical_on_both_ranks(two_ranks):
    _, (r0, r1) = two_ranks
    for key in ("delta_params", "whole_params", "resumed_params"):
        for name, value in r0[key].items():
            assert torch.equal(value, r1[key][name]), (key, name)
    # training moved them: identical because of the all-reduce, not because nothing happened
    torch.manual_seed(0)
    assert not torch.allclose(DeltaPair().enc.weight, r0["delta_params"]["enc.weight"])


def test_two_ranks_equal_single_process_with_the_same_global_batches(two_ranks):
    _, (r0, r1) = two_ranks
    reference, losses = _single_process_delta()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(r0["delta_params"][name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.as_tensor(r0["delta_loss"]), torch.tensor(losses, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    # the ELBO is averaged over both ranks' shards, so both report the same number
    assert list(r0["delta_elbo"]) == list(r1["delta_elbo"])
    assert losses[-1] < losses[0]


def test_an_evaluated_set_smaller_than_the_number_of_ranks_is_scored(two_ranks):
    _, (r0, r1) = two_ranks
    assert all(math.isfinite(v) for v in r0["tiny_elbos"]) and r0["tiny_elbos"] == r1["tiny_elbos"]


def test_gaussian_mlp_trajectory_matches_single_process(two_ranks, tmp_path):
    _, (r0, _) = two_ranks
    single = pipeline.fit(_digits_config(2), tmp_path / "single", progress=False)
    ddp = r0["digits_elbo"]
    gain = single.history.train_elbo.values[-1] - single.history.train_elbo.values[0]
    assert gain > 5.0  # the run learns, so agreement is not trivial
    for a, b in zip(ddp, single.history.train_elbo.values):
        assert abs(a - b) < 0.25 * gain + 2.0, (list(ddp), list(single.history.train_elbo.values))


def test_resume_continues_exactly_and_rank0_alone_writes(two_ranks):
    tmp, (r0, r1) = two_ranks
    for name, value in r0["whole_params"].items():
        torch.testing.assert_close(r0["resumed_params"][name], value, rtol=1e-5, atol=1e-6)
    history = runs.load_history(tmp / "resumed")
    assert list(history.epoch.values) == [1, 2]
    tensors, meta = runs.read_checkpoint(tmp / "whole")
    assert meta["epoch"] == 2
    for name, value in r0["whole_params"].items():
        assert torch.equal(tensors[f"model.{name}"], value)
    assert not (tmp / "whole-rank1").exists()  # rank 1 was given its own path and wrote nothing


def _stalling_worker() -> None:
    """Rank 1 joins the group and then stalls; rank 0 trains and must time out, not hang."""
    with distributed.process_group("cpu", timeout_s=2) as ctx:
        if ctx.rank == 1:
            time.sleep(120)
        train(DeltaPair(), _delta_data(), _delta_config(), progress=False, dist=ctx)


def test_stalled_rank_stops_the_run_with_a_clear_error():
    start = time.perf_counter()
    with pytest.raises(distributed.DistributedError) as info:
        distributed.launch(_stalling_worker, nproc=2)
    assert time.perf_counter() - start < 60
    message = str(info.value)
    assert "\n" not in message
    assert "rank 0" in message and "timed out" in message and "timeout 2 s" in message


@pytest.mark.slow  # a spawn of its own: the whole CLI path, launcher and run loading
def test_cli_fit_with_nproc(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "fit",
            "--nproc",
            "2",
            "--epochs",
            "1",
            "--train-size",
            "200",
            "--hidden-dim",
            "16",
            "--batch-size",
            "50",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "epoch 1:" in result.output
    assert runs.read_checkpoint(out)[1]["epoch"] == 1
    assert float(runs.load_history(out).num_train_samples[-1]) == 200


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--nproc", "0"], "nproc must be >= 1"),
        (["--nproc", "2", "--batch-size", "51"], "must be divisible by the number of processes (2)"),
        (["--nproc", "2", "--device", "cuda:1"], "device"),
        (["--nproc", "2", "--dist-timeout", "0"], "timeout"),
    ],
)
def test_cli_rejects_bad_distributed_options(tmp_path, args, expected):
    result = CliRunner().invoke(cli, ["fit", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code != 0
    assert expected in result.output
    assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) == 1
