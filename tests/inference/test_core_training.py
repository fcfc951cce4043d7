"""SVI training, checkpoints, resume, divergence handling, and run-directory safety."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
import xarray as xr

import ppl_vae
from ppl_vae import runs
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.errors import RunDirError, TrainingDiverged
from ppl_vae.pipeline import Job, prepare, run_job
from tests.conftest import drop_checkpoint_config


def small_config(**train) -> RunConfig:
    defaults = dict(epochs=3, batch_size=64, lr=3e-3, device="cpu")
    defaults.update(train)
    return RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=4, hidden_dim=32),
        data=DataConfig(dataset="digits", train_size=400),
        train=TrainConfig(**defaults),
    )


def test_config_round_trips_through_json():
    config = small_config(kl_warmup_epochs=2, elbo="mean_field")
    config.model.prior, config.model.prior_options = "mixture_of_gaussians", {"num_components": 3}
    assert RunConfig.from_json(config.to_json()) == config
    raw = json.loads(config.to_json())
    raw["train"]["epochz"] = 3
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_json(json.dumps(raw))


def test_training_improves_the_test_elbo(tmp_path):
    run = ppl_vae.fit(small_config(epochs=6), tmp_path / "run", progress=False)
    h = run.history
    assert list(h.epoch.values) == [1, 2, 3, 4, 5, 6]
    assert h.test_elbo[-1] > h.test_elbo[0] + 5.0  # nats per datapoint
    assert (h.num_train_samples.diff("epoch") == 400).all()
    assert float(h.wall_time[-1]) > 0 and (h.kl_weight == 1.0).all()


def test_run_directory_contents_and_load(tmp_path):
    run = ppl_vae.fit(small_config(epochs=2), tmp_path / "run", progress=False)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint.safetensors", "config.json", "history.nc"]
    loaded = ppl_vae.load_run(tmp_path / "run")
    assert loaded.config == run.config
    for (k, a), (_, b) in zip(run.vae.state_dict().items(), loaded.vae.state_dict().items()):
        assert torch.equal(a, b), k
    history = xr.open_dataset(tmp_path / "run" / "history.nc", engine="h5netcdf")
    assert history.test_elbo.dims == ("epoch",)
    assert float(history.test_elbo[-1]) == pytest.approx(run.final["test_elbo"])
    history.close()


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = ppl_vae.fit(small_config(epochs=4), tmp_path / "a", progress=False)
    ppl_vae.fit(small_config(epochs=2), tmp_path / "b", progress=False)
    resumed = ppl_vae.resume(tmp_path / "b", epochs=4, progress=False)
    assert list(resumed.history.epoch.values) == [1, 2, 3, 4]
    for (k, a), (_, b) in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), k
    assert resumed.final["test_elbo"] == straight.final["test_elbo"]
    assert ppl_vae.load_run(tmp_path / "b").config.train.epochs == 4


def test_kl_warmup_raises_the_weight_linearly(tmp_path):
    run = ppl_vae.fit(small_config(epochs=3, kl_warmup_epochs=2), tmp_path / "run", progress=False)
    assert run.history.kl_weight.values.tolist() == pytest.approx([0.5, 1.0, 1.0])


def test_mean_field_elbo_trains(tmp_path):
    run = ppl_vae.fit(small_config(epochs=3, elbo="mean_field"), tmp_path / "run", progress=False)
    assert run.history.test_elbo[-1] > run.history.test_elbo[0]


def test_compiled_loss_equals_the_eager_loss():
    """compile= replaces the torch.jit ELBOs; the 'eager' backend runs dynamo's capture without
    inductor's C++ build, so the test stays fast and checks that capture changes no number."""
    from ppl_vae.inference.training import SVIStepper
    from ppl_vae.pipeline import prepare

    config = small_config(epochs=1)
    vae, data, eager = prepare(config)
    compiled = SVIStepper(vae, replace(config.train, compile="eager"))
    x = data.train[:32]
    torch.manual_seed(3)
    a = eager.loss(x, num_data=400)
    assert compiled.loss_fn is not compiled.loss  # the step calls the compiled loss
    torch.manual_seed(3)
    b = compiled.loss_fn(x, num_data=400)
    assert torch.allclose(a, b, rtol=1e-6)
    grads = [torch.autograd.grad(loss, list(vae.parameters())) for loss in (a, b)]
    assert all(torch.allclose(g, h, rtol=1e-5, atol=1e-7) for g, h in zip(*grads))


@pytest.mark.parametrize("finite_check", ["step", "epoch"])
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, finite_check):
    """Checked before every update, or tracked on the device and checked at the epoch's end."""
    config = small_config(epochs=5, finite_check=finite_check)
    vae, data, stepper = prepare(config)
    calls = {"n": 0}

    def poison_after_ten_training_steps(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] > 10:  # step 11 is in epoch 2 (7 steps per epoch)
                return tuple(torch.full_like(o, float("nan")) for o in output)
        return output

    vae.decoder.register_forward_hook(poison_after_ten_training_steps)
    run_dir = tmp_path / "run"
    job = Job(config, run_dir, fresh=True, created=True, progress=False)
    with pytest.raises(
        TrainingDiverged,
        match=r"loss became n.* at step 11 \(epoch 2\); try a smaller train.lr or gradient "
        r"clipping \(train.clip_grad_norm, e.g. 10\); "
        r"the last good checkpoint is from epoch 1",
    ) as info:
        run_job(job, (vae, data, stepper))
    assert info.value.step == 11
    tensors, meta = runs.read_checkpoint(run_dir)
    assert meta["epoch"] == 1 and meta["step"] == 7
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))
    assert runs.load_history(run_dir).epoch.values.tolist() == [1]


def test_resume_refuses_a_changed_optimizer(tmp_path):
    ppl_vae.fit(small_config(epochs=1), tmp_path / "run", progress=False)
    config = runs.load_config(tmp_path / "run")
    config.train.optimizer = "sgd"
    runs.save_config(tmp_path / "run", config)
    # an edited config.json is refused for differing from the checkpoint's config (--optimizer changes it)
    with pytest.raises(RunDirError, match="has 'train.optimizer' = \"sgd\" but the run's checkpoint was trained"):
        ppl_vae.resume(tmp_path / "run", epochs=2, progress=False)
    drop_checkpoint_config(tmp_path / "run")  # a checkpoint without it: the optimizer state says so
    with pytest.raises(RunDirError, match="holds Adam state but the config asks for SGD"):
        ppl_vae.resume(tmp_path / "run", epochs=2, progress=False)


def test_existing_run_directory_is_not_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="already holds files"):
        ppl_vae.fit(small_config(), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_a_crafted_pickle_is_refused(tmp_path):
    ppl_vae.fit(small_config(epochs=1), tmp_path / "run", progress=False)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "run" / "checkpoint.safetensors").write_bytes(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(RunDirError, match="refusing to load"):
        ppl_vae.load_run(tmp_path / "run")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, damage):
    ppl_vae.fit(small_config(epochs=1), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "checkpoint.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(RunDirError, match="corrupt or not a ppl_vae checkpoint"):
        ppl_vae.load_run(tmp_path / "run")


def test_damaged_history_and_config(tmp_path):
    ppl_vae.fit(small_config(epochs=1), tmp_path / "run", progress=False)
    eager = ppl_vae.load_run(tmp_path / "run")
    lazy = ppl_vae.load_run(tmp_path / "run", history=False)  # evaluate and compare: read after the scoring
    assert lazy.history is None and lazy.read_history().identical(eager.history) and lazy.epochs_done == 1
    (tmp_path / "run" / "history.nc").write_bytes(b"not netcdf")
    with pytest.raises(RunDirError, match="history.nc is corrupt"):
        ppl_vae.load_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="history.nc is corrupt"):  # told before any scoring
        ppl_vae.load_run(tmp_path / "run", history=False)
    (tmp_path / "run" / "config.json").write_text("{")
    with pytest.raises(RunDirError, match="not valid JSON"):
        ppl_vae.load_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="run directory not found"):
        ppl_vae.load_run(tmp_path / "absent")


def test_bad_train_settings_are_value_errors(tmp_path):
    for train, message in [
        ({"batch_size": 0}, "train.batch_size must be >= 1"),
        ({"lr": -1.0}, "train.lr must be a positive number"),
        ({"optimizer": "lbfgs"}, "train.optimizer must be one of adagrad, adam, adamax, sgd"),
        ({"elbo": "renyi"}, "train.elbo must be one of"),
        ({"elbo": "jit_trace"}, "no longer offered .* use elbo 'trace' with compile 'inductor'"),
        ({"method": "gibbs"}, "train.method must be one of"),
        ({"device": "tpu"}, "train.device must be"),
        ({"compile": "no-such-backend"}, "train.compile must be null or a torch.compile backend"),
        ({"finite_check": "never"}, "train.finite_check must be one of auto, step, epoch"),
        ({"train_eval_size": 0}, "train.train_eval_size must be >= 1 or null"),
    ]:
        with pytest.raises(ValueError, match=message):
            ppl_vae.fit(small_config(**train), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        ppl_vae.fit(small_config(device="cuda"), tmp_path / "run", progress=False)


def test_callbacks_run_before_training_and_after_every_epoch(tmp_path):
    seen = []
    ppl_vae.fit(
        small_config(epochs=2),
        tmp_path / "run",
        progress=False,
        callbacks=[lambda epoch, vae: seen.append((epoch, vae.training))],
    )
    ppl_vae.resume(
        tmp_path / "run", epochs=3, progress=False, callbacks=[lambda epoch, vae: seen.append((epoch, None))]
    )
    assert [e for e, _ in seen] == [0, 1, 2, 3]


def test_train_takes_a_hand_written_pair_that_declares_nothing(one_thread):
    """train() read vae.num_classes and raised AttributeError for a module with only model and
    guide; such a pair now trains through Pyro's traces, every parameter moving."""
    import pyro
    from pyro import distributions as dist

    from ppl_vae.inference.training import train

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = torch.nn.Linear(2, 64)
            self.enc = torch.nn.Linear(64, 4)

        def model(self, x, y=None, *, num_data=None, kl_weight=1.0):
            x = x.reshape(x.shape[0], -1)
            with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=(num_data or x.shape[0]) / x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).expand([x.shape[0], 2]).to_event(1))
                pyro.sample("x", dist.Normal(self.dec(z), 0.3).to_event(1), obs=x)

        def guide(self, x, y=None, *, num_data=None, kl_weight=1.0):
            h = self.enc(x.reshape(x.shape[0], -1))
            with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=(num_data or x.shape[0]) / x.shape[0]):
                pyro.sample("z", dist.Normal(h[..., :2], torch.nn.functional.softplus(h[..., 2:]) + 1e-3).to_event(1))

    torch.manual_seed(0)
    pair = Pair()
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    data = ppl_vae.load_dataset("digits", train_size=200)
    history = train(pair, data, TrainConfig(epochs=1, device="cpu", batch_size=50), progress=False, evaluate=False)
    assert history.sizes["epoch"] == 1
    assert all(not torch.equal(v, before[k]) for k, v in pair.state_dict().items())
