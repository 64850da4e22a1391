"""Optimiser: learning-rate groups, schedules and AdamW against PyTorch."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hyperiqa_jax import optim


def _config(**kw):
    c = ml_collections.ConfigDict(dict(
        lr=5e-7, lr_ratio=10.0, weight_decay=2e-4, schedule="cosine_epoch", eta_min=1e-6,
        warmup_steps=0, grad_clip=1.0, epochs=10))
    c.update(kw)
    return c


def test_cosine_epoch_matches_closed_form_and_rises_below_eta_min():
    spe = 7
    s = optim.lr_schedules(_config(), spe)
    for step in [0, 1, 6, 7, 13, 14, 35, 69]:
        epoch = step // spe
        want_bb = optim.cosine_annealing_lr(5e-7, 1e-6, epoch, 10)
        want_head = optim.cosine_annealing_lr(5e-6, 1e-6, epoch, 10)
        np.testing.assert_allclose(float(s["backbone"](step)), want_bb, rtol=1e-5)
        np.testing.assert_allclose(float(s["head"](step)), want_head, rtol=1e-5)
    # The backbone's 5e-7 is below eta_min: it rises toward 1e-6, as PyTorch does.
    assert float(s["backbone"](9 * spe)) > float(s["backbone"](0))
    assert float(s["head"](9 * spe)) < float(s["head"](0))


def test_cosine_epoch_matches_torch_scheduler():
    torch = pytest.importorskip("torch")
    p = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [p[0]], "lr": 5e-7}, {"params": [p[1]], "lr": 5e-6}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-6)
    s = optim.lr_schedules(_config(), 3)
    for epoch in range(12):
        got = [float(s["backbone"](epoch * 3 + 1)), float(s["head"](epoch * 3 + 2))]
        want = [g["lr"] for g in opt.param_groups]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        opt.step()
        sched.step()


def test_warmup_cosine():
    s = optim.lr_schedules(_config(schedule="warmup_cosine", lr=1e-3, eta_min=1e-5,
                                   warmup_steps=10, epochs=2), 50)
    assert float(s["backbone"](0)) == 0.0
    np.testing.assert_allclose(float(s["backbone"](5)), 5e-4, rtol=1e-5)
    np.testing.assert_allclose(float(s["backbone"](10)), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(float(s["head"](10)), 1e-2, rtol=1e-5)
    np.testing.assert_allclose(float(s["backbone"](100)), 1e-5, rtol=1e-4)
    np.testing.assert_allclose(float(s["head"](100)), 1e-4, rtol=1e-4)
    mid = 10 + 45
    want = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)) / 2
    np.testing.assert_allclose(float(s["backbone"](mid)), want, rtol=1e-4)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        optim.lr_schedules(_config(schedule="linear"), 10)


def test_adamw_groups_and_clipping_match_torch():
    """Three steps of clipped AdamW with two groups equal torch's, per epoch cosine."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w_bb = rng.normal(size=(4, 3)).astype(np.float32)
    w_head = rng.normal(size=(3,)).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)).astype(np.float32) * 3,
              rng.normal(size=(3,)).astype(np.float32)) for _ in range(3)]
    cfg = _config(lr=1e-2, lr_ratio=10.0, weight_decay=0.05, eta_min=1e-3, epochs=3)

    tp = [torch.nn.Parameter(torch.tensor(w_bb)), torch.nn.Parameter(torch.tensor(w_head))]
    topt = torch.optim.AdamW([{"params": [tp[0]], "lr": 1e-2}, {"params": [tp[1]], "lr": 1e-1}],
                             weight_decay=0.05, eps=1e-8)
    tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=3, eta_min=1e-3)
    for g_bb, g_head in grads:
        tp[0].grad, tp[1].grad = torch.tensor(g_bb), torch.tensor(g_head)
        torch.nn.utils.clip_grad_norm_(tp, 1.0)
        topt.step()
        tsched.step()  # steps_per_epoch = 1

    params = {"backbone": {"w": jnp.asarray(w_bb)}, "head": {"b": jnp.asarray(w_head)}}
    tx = optim.make_optimizer(cfg, steps_per_epoch=1)
    state = tx.init(params)
    for g_bb, g_head in grads:
        g = {"backbone": {"w": jnp.asarray(g_bb)}, "head": {"b": jnp.asarray(g_head)}}
        updates, state = tx.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(params["backbone"]["w"], tp[0].detach().numpy(), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(params["head"]["b"], tp[1].detach().numpy(), rtol=1e-5, atol=1e-7)


def test_labels():
    params = {"backbone": {"a": {"k": 1}}, "conv1": {"k": 2}, "fc": {"b": 3}}
    assert optim.param_labels(params) == {
        "backbone": {"a": {"k": "backbone"}}, "conv1": {"k": "head"}, "fc": {"b": "head"}}
