"""The balancers on their own (one process, no DeepSpeed): the math of each method against torchjd or a
hand computation, their checkpoint state, and the ``loss`` config section."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlora_dist.config import ConfigError, LossConfig, load_config
from mtlora_dist.tasks.balancing import DWA, Balancer, BalancerMismatchError, GramianWeighting, build_balancer
from mtlora_dist.tasks.losses import MultiTaskLoss

TASKS = ["semseg", "sal"]
BASE = {"semseg": 1.0, "sal": 5.0}


def _per_task(values: list[float], requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {t: torch.tensor(v, requires_grad=requires_grad) for t, v in zip(TASKS, values)}


def test_fixed_is_the_pre_balancing_total_bit_for_bit():
    torch.manual_seed(0)
    preds = {"semseg": torch.randn(2, 21, 8, 8, requires_grad=True), "sal": torch.randn(2, 1, 8, 8, requires_grad=True)}
    batch = {"semseg": torch.randint(0, 21, (2, 8, 8)), "sal": torch.randint(0, 2, (2, 8, 8))}
    loss = MultiTaskLoss(TASKS)
    total, per_task = loss(preds, batch)
    # MultiTaskLoss.forward's total before loss.balancing, verbatim
    legacy = torch.stack([loss.weights[t] * loss.losses[t](preds[t], batch[t]) for t in TASKS]).sum()
    assert torch.equal(total, legacy)
    grads = torch.autograd.grad(total, list(preds.values()), retain_graph=True)
    legacy_grads = torch.autograd.grad(legacy, list(preds.values()))
    assert all(torch.equal(a, b) for a, b in zip(grads, legacy_grads))
    assert {t: float(w) for t, w in loss.weights_used().items()} == {"semseg": 1.0, "sal": loss.weights["sal"]}


def test_uncertainty_is_torchjd_uw_and_learns_the_log_variances():
    from torchjd.scalarization import UW

    cfg = LossConfig(balancing="uncertainty")
    cfg.uncertainty.lr = 0.1
    balancer = build_balancer(cfg, TASKS, BASE)
    per_task = _per_task([2.0, 0.1], requires_grad=True)
    total = balancer.combine(per_task)
    reference = UW(2)(torch.stack([1.0 * per_task["semseg"], 5.0 * per_task["sal"]]))
    assert torch.allclose(total, reference)
    # the model sees exp(-s)/2 per weighted loss; s itself gets no gradient through the engine's backward
    grads = torch.autograd.grad(total, list(per_task.values()))
    assert torch.allclose(torch.stack(grads), torch.tensor([0.5, 2.5]))
    balancer.end_step()
    s = balancer.log_var.detach()
    # ds = (1 - exp(-s) w L) / 2: negative for semseg (w L = 2 > 1), positive for sal (w L = 0.5 < 1)
    assert s[0] > 0 > s[1]
    balancer.combine(per_task)  # the next step's weights come from the new s
    used = torch.stack(list(balancer.weights_used().values()))
    assert torch.allclose(used, torch.exp(-s) / 2 * torch.tensor([1.0, 5.0]))


def test_dwa_gives_torchjd_dwa_weights():
    from torchjd.scalarization import DWA as TorchjdDWA

    torch.manual_seed(1)
    ours, theirs = DWA(TASKS, {"semseg": 1.0, "sal": 1.0}, temperature=2.0, window=3), TorchjdDWA(temperature=2.0)
    for epoch in range(4):
        for _ in range(3):
            values = torch.rand(2) + 0.5
            x = values.clone().requires_grad_(True)
            (expected,) = torch.autograd.grad(theirs(x), x)  # torchjd's weights of this batch
            used = torch.stack(list(ours.weights_used().values()))
            total = ours.combine(dict(zip(TASKS, values)))
            assert torch.allclose(used, expected), (epoch, used, expected)
            assert torch.allclose(total, (expected * values).sum())
            ours.end_step()
        theirs.step()
    assert not torch.allclose(used, torch.ones(2))  # the last epochs were weighted


def _toy(conflict: bool):
    """z -> two task losses whose gradients w.r.t. z conflict (or not)."""
    z = torch.tensor([1.0, 1.0], requires_grad=True)
    b = -0.5 if conflict else 0.5
    return z, {"semseg": z[0] + 0.0 * z[1], "sal": b * z[0] + z[1]}


@pytest.mark.parametrize("conflict", [False, True])
def test_upgrad_weights_the_gramian_of_the_per_task_gradients(conflict):
    from torchjd.aggregation import UPGradWeighting

    balancer = GramianWeighting(TASKS, {"semseg": 1.0, "sal": 1.0}, weighting="upgrad")
    z, per_task = _toy(conflict)
    balancer._z = z
    total = balancer.combine(per_task)
    jacobian = torch.tensor([[1.0, 0.0], [-0.5 if conflict else 0.5, 1.0]])
    expected = UPGradWeighting(pref_vector=torch.ones(2, dtype=torch.float64))((jacobian @ jacobian.T).double())
    alpha = torch.stack(list(balancer.weights_used().values()))
    assert torch.allclose(alpha.double(), expected, atol=1e-6)
    assert torch.allclose(total, (alpha * torch.stack(list(per_task.values()))).sum())
    if not conflict:  # no conflict: the plain sum (weights of one)
        assert torch.allclose(alpha, torch.ones(2), atol=1e-3)
    else:  # the conflicting task's gradient is projected: it weighs more than one
        assert (alpha > 1.0).any()


def test_gramian_weighting_hooks_the_shared_module_and_sums_to_t_for_mgda():
    model = nn.ModuleDict({"stem": nn.Linear(3, 4), "a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    balancer = GramianWeighting(TASKS, BASE, weighting="mgda", module="stem")
    balancer.attach(model)
    z = model["stem"](torch.randn(5, 3))
    total = balancer.combine({"semseg": model["a"](z).pow(2).mean(), "sal": -model["b"](z).mean()})
    total.backward()
    alpha = torch.stack([w / BASE[t] for t, w in balancer.weights_used().items()])
    assert torch.isclose(alpha.sum(), torch.tensor(2.0), atol=1e-4) and (alpha >= 0).all()
    with pytest.raises(ValueError, match="not a module of the model"):
        GramianWeighting(TASKS, BASE, module="nope").attach(model)


def test_state_round_trip_and_mismatch():
    a = DWA(TASKS, BASE, window=1)
    for values in ([1.0, 1.0], [0.5, 0.9], [0.4, 0.8]):
        a.combine(_per_task(values))
        a.end_step()
    b = DWA(TASKS, BASE, window=1)
    b.load_state_dict(a.state_dict(), same_world=True)
    assert all(torch.equal(a.weights_used()[t], b.weights_used()[t]) for t in TASKS)
    with pytest.raises(BalancerMismatchError, match="loss.balancing=dwa"):
        Balancer(TASKS, BASE).load_state_dict(a.state_dict(), same_world=True)


def test_loss_config_is_checked():
    assert load_config(None, []).loss.balancing == "fixed"
    assert load_config(None, ["loss.balancing=upgrad", "deepspeed=zero3"]).deepspeed.zero_stage == 3
    with pytest.raises(ConfigError, match="loss.dwa.temperature"):
        load_config(None, ["loss.balancing=dwa", "loss.dwa.temperature=0"])
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(None, ["loss.balancing=libmtl"])


def test_the_train_record_has_each_tasks_weight_for_metrics_jsonl_and_wandb(tmp_path):
    import json
    from types import SimpleNamespace

    from mtlora_dist.engine import trainer
    from mtlora_dist.engine.console import Progress
    from mtlora_dist.engine.run_logger import RunLogger, _flatten

    logger = RunLogger(str(tmp_path), enabled=True, start=False)
    engine, loader = SimpleNamespace(get_lr=lambda: [0.1], device=torch.device("cpu")), SimpleNamespace(stats={})
    values = {"loss": torch.tensor(3.0), "semseg": torch.tensor(1.0), "sal": torch.tensor(0.4)}
    values |= {f"{trainer._WEIGHT}{t}": torch.tensor(w) for t, w in BASE.items()}
    trainer._log_train(logger, Progress(1, 0, enabled=False, bar=False), 1, values, engine, 10.0, 0.5, loader)
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["losses"] == {"semseg": 1.0, "sal": pytest.approx(0.4)} and record["loss_weights"] == BASE
    assert {k: v for k, v in _flatten(record).items() if k.startswith("loss_weights/")} == {
        "loss_weights/semseg": 1.0,
        "loss_weights/sal": 5.0,
    }  # the keys wandb gets


def test_zero3_rearm_puts_back_the_counts_the_forward_left():
    from mtlora_dist.tasks.balancing import _zero3_rearm

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].applied_pre_backward_ref_cnt, model[0].ds_grads_remaining = 1, 1  # what a ZeRO-3 forward leaves
    rearm = _zero3_rearm(model)
    model[0].applied_pre_backward_ref_cnt = model[0].ds_grads_remaining = 0  # a backward used them up
    rearm()
    assert (model[0].applied_pre_backward_ref_cnt, model[0].ds_grads_remaining) == (1, 1)
    assert "applied_pre_backward_ref_cnt" not in model[1].__dict__  # modules without ZeRO-3 hooks: untouched
    _zero3_rearm(None)()  # no engine attached: nothing to do
