"""The PyTorch original's optimiser (config_defaults.py): clipped AdamW, two learning-rate groups.

The backbone (top-level parameter key 'backbone') trains at `lr`, every other
parameter at `lr * lr_ratio`. AdamW follows torch.optim.AdamW: decoupled weight
decay `lr * wd * param`, eps 1e-8 added after the square root.

Schedules (`train_config.schedule`):
  cosine_epoch   PyTorch CosineAnnealingLR(T_max=epochs, eta_min) stepped once
                 per epoch: constant within an epoch. A group whose base lr is
                 below eta_min rises toward eta_min, as in PyTorch (the original's
                 backbone lr 5e-7 with eta_min 1e-6 does this).
  warmup_cosine  per step: linear warmup from 0 over `warmup_steps`, then cosine
                 to `eta_min * group_lr / lr` (both groups keep their ratio).
  constant       each group at its base lr.
"""

import jax
import jax.numpy as jnp
import optax

BACKBONE = "backbone"
HEAD = "head"


def param_labels(params):
    """'backbone' for everything under params['backbone'], 'head' for the rest."""
    return {k: jax.tree.map(lambda _, k=k: BACKBONE if k == BACKBONE else HEAD, v)
            for k, v in params.items()}


def lr_schedules(train_config, steps_per_epoch):
    """Returns {'backbone': schedule, 'head': schedule}; schedule(step) -> lr."""
    lr, ratio = float(train_config.lr), float(train_config.lr_ratio)
    eta_min = float(train_config.eta_min)
    epochs = int(train_config.epochs)
    total_steps = max(1, epochs * int(steps_per_epoch))
    kind = train_config.schedule

    def make(base_lr):
        if kind == "constant":
            return optax.constant_schedule(base_lr)
        if kind == "cosine_epoch":
            def schedule(step):
                epoch = jnp.asarray(step) // steps_per_epoch
                cos = jnp.cos(jnp.pi * epoch / epochs)
                return eta_min + (base_lr - eta_min) * (1 + cos) / 2
            return schedule
        if kind == "warmup_cosine":
            warmup = int(train_config.warmup_steps)
            return optax.warmup_cosine_decay_schedule(
                init_value=0.0, peak_value=base_lr, warmup_steps=warmup,
                decay_steps=max(total_steps, warmup + 1), end_value=eta_min * base_lr / lr)
        raise ValueError(f"Unknown train.schedule {kind!r}: "
                         "use 'cosine_epoch', 'warmup_cosine' or 'constant'.")

    return {BACKBONE: make(lr), HEAD: make(lr * ratio)}


def make_optimizer(train_config, steps_per_epoch):
    """Clip by global norm, then AdamW with one schedule per parameter group."""
    schedules = lr_schedules(train_config, steps_per_epoch)
    wd = float(train_config.weight_decay)
    groups = {name: optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)
              for name, sched in schedules.items()}
    chain = []
    if train_config.get("grad_clip", 0):
        chain.append(optax.clip_by_global_norm(float(train_config.grad_clip)))
    chain.append(optax.partition(groups, param_labels))
    return optax.chain(*chain)
