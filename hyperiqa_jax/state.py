"""The train state: how it is built, its abstract shapes, and what inference keeps of it.

The state is a plain dict {step, params, opt_state, rng[, batch_stats]}.
Inference needs only the model variables {params[, batch_stats]}, whose shapes
come from the model alone, so scoring restores them without building an
optimiser or importing the trainer.
"""

import jax
import jax.numpy as jnp


def init_variables(model, crop_size, params_rng, dropout_rng):
    """The model's initial variables {params[, batch_stats]} for crops of `crop_size`."""
    images = jnp.zeros((1, crop_size, crop_size, 3), jnp.float32)
    return dict(model.init({"params": params_rng, "dropout": dropout_rng}, images, train=False))


def new_train_state(variables, tx, rng):
    """Step 0 of training from `variables`: fresh optimiser state, `rng` for dropout."""
    train_state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                   "opt_state": tx.init(variables["params"]), "rng": rng}
    if "batch_stats" in variables:
        train_state["batch_stats"] = variables["batch_stats"]
    return train_state


def init_train_state(model, tx, crop_size, rng):
    """A freshly initialised train state (run under jit with output shardings)."""
    params_rng, dropout_rng, train_rng = jax.random.split(rng, 3)
    return new_train_state(init_variables(model, crop_size, params_rng, dropout_rng), tx,
                           train_rng)


def inference_variables(train_state):
    """What scoring needs of a train state: {params[, batch_stats]}."""
    return {k: train_state[k] for k in ("params", "batch_stats") if k in train_state}


def abstract_inference_variables(model, crop_size):
    """Shapes and dtypes of the model's variables (`jax.ShapeDtypeStruct`s), computed lazily."""
    rng = jax.random.PRNGKey(0)
    return jax.eval_shape(lambda r: init_variables(model, crop_size, r, r), rng)
