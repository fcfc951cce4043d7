"""EagerAdam is torch's Adam, minus the torch._dynamo import (inference/optim.py)."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from ppl_vae.inference.optim import EagerAdam, optimizer_kind


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))


def _train(net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        net(torch.randn(5, 6, generator=gen)).pow(2).sum().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "options",
    [{"fused": True}, {"foreach": True}, {"foreach": False}, {"amsgrad": True, "weight_decay": 0.1, "fused": True}],
    ids=["fused", "foreach", "single-tensor", "amsgrad-wd"],
)
def test_steps_equal_torch_adam_bit_for_bit(options):
    ours, theirs = _net(), _net()
    _train(ours, EagerAdam(ours.parameters(), lr=3e-2, **options), 25)
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=3e-2, **options), 25)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(ours.parameters()), next(_net().parameters()))  # it did move


def test_state_dicts_load_into_either_class_and_continue_identically():
    net = _net()
    ours = EagerAdam(net.parameters(), lr=1e-2, fused=True)
    _train(net, ours, 7)
    state, weights = copy.deepcopy(ours.state_dict()), copy.deepcopy(net.state_dict())
    # our state into torch's Adam, and torch's state (after the same steps) into ours
    continued = {}
    for name, cls in (("torch", torch.optim.Adam), ("eager", EagerAdam)):
        other = _net()
        other.load_state_dict(weights)
        opt = cls(other.parameters(), lr=1e-2, fused=True)
        opt.load_state_dict(copy.deepcopy(state))  # loading shares tensors with the dict given
        _train(other, opt, 5, seed=2)
        continued[name] = [p.detach().clone() for p in other.parameters()]
    _train(net, ours, 5, seed=2)
    for a, b, c in zip(net.parameters(), continued["torch"], continued["eager"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert (
        ours.state_dict()["param_groups"][0].keys()
        == torch.optim.Adam(_net().parameters()).state_dict()["param_groups"][0].keys()
    )


def test_lr_schedulers_accept_it():
    net = _net()
    opt = EagerAdam(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        _train(net, opt, 1)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_step_runs_without_grad_and_restores_grad_mode():
    net = _net()
    opt = EagerAdam(net.parameters(), lr=1e-2)
    net(torch.ones(1, 6)).sum().backward()
    assert torch.is_grad_enabled()
    opt.step()  # an in-place update of leaves that require grad: only legal without grad
    assert torch.is_grad_enabled()
    with torch.no_grad():
        opt.step()
        assert not torch.is_grad_enabled()


def test_closure_steps_like_torch_adam():
    results = []
    for cls in (EagerAdam, torch.optim.Adam):
        net = _net()
        opt = cls(net.parameters(), lr=1e-2)
        x = torch.ones(2, 6)

        def closure(opt=opt, net=net, x=x):
            opt.zero_grad()
            loss = net(x).pow(2).sum()
            loss.backward()
            return loss

        with torch.no_grad():  # the closure is evaluated with grad enabled all the same
            losses = [float(opt.step(closure)) for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in net.parameters()]))
    (ours, our_params), (theirs, their_params) = results
    assert ours == theirs and ours[0] > ours[-1]
    assert all(torch.equal(a, b) for a, b in zip(our_params, their_params))


def test_never_imports_torch_dynamo():
    # a fresh interpreter: whatever the test session imported does not count
    code = textwrap.dedent(
        """
        import sys, torch
        from ppl_vae.inference.optim import EagerAdam
        net = torch.nn.Linear(3, 2)
        opt = EagerAdam(net.parameters(), lr=1e-3, fused=True)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            net(torch.ones(4, 3)).sum().backward()
            opt.step()
        opt.load_state_dict(opt.state_dict())
        print("torch._dynamo" in sys.modules)
        torch.optim.Adam(net.parameters())  # the check can fail: torch's own Adam imports it
        print("torch._dynamo" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_checkpoints_name_the_torch_class():
    # runs saved before EagerAdam recorded "Adam"; both classes must keep resuming each other's
    net = _net()
    assert optimizer_kind(EagerAdam(net.parameters())) == "Adam"
    assert optimizer_kind(torch.optim.Adam(net.parameters())) == "Adam"
    assert optimizer_kind(torch.optim.SGD(net.parameters(), lr=0.1)) == "SGD"

    class Custom(torch.optim.Optimizer):
        pass

    assert optimizer_kind(Custom(net.parameters(), {})) == "Custom"
