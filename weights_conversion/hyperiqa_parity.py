"""Full-model parity: the JAX HyperIQA against `torch_reference.HyperIQAReference`.

Forward: same (perturbed, score-calibrated) weights and images, float32, every
intermediate compared: stage maps, pooled maps, LDA vector, fused map,
hyper_in_feat, every generated target weight and bias, attention, score.

Training steps: the two halves of `hyperiqa_jax.train.train_step` (the step
training runs), each on the same inputs as PyTorch at every step of a short run,
dropout and drop path off: `train.loss_and_grads` (uint8 crops normalised inside
it, L1 loss) against torch's backward, comparing the loss, the gradients and
(ResNet) the BatchNorm running statistics; then the optimiser (global-norm
clipping, AdamW with the two learning-rate groups and the config's schedule)
against `clip_grad_norm_` and `torch.optim.AdamW`, both fed torch's gradients.

Used by `python -m weights_conversion.validate_parity --config configs/X.py` and the tests.
"""

import copy
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

from hyperiqa_jax.data.image import normalize
from hyperiqa_jax.models import RESNET_BACKBONES, build_model
from weights_conversion import hyperiqa as conversion
from weights_conversion import parity_limits
from weights_conversion import swin as swin_conversion
from weights_conversion.torch_reference import HyperIQAReference, calibrate_scores, perturb

NCHW_KEYS = ("stage_maps", "pooled_maps", "fused", "hyper_in_feat")


def make_crops(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 NHWC crops that differ in colour, structure and noise level."""
    rng = np.random.RandomState(seed)
    images = []
    for i in range(batch):
        cells = 2 ** (1 + i % 4)  # coarse blocks of different sizes.
        block = rng.rand(cells, cells, 3)
        image = np.kron(block, np.ones((size // cells + 1, size // cells + 1, 1)))[:size, :size]
        image = image + rng.randn(size, size, 3) * 0.04 * (1 + i)
        images.append(np.clip(image, 0.0, 1.0))
    return np.round(np.stack(images) * 255).astype(np.uint8)


def make_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """`make_crops` normalised as the model sees them (float32 NHWC)."""
    return normalize(make_crops(batch, size, seed))


def _nhwc(tensor) -> np.ndarray:
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def compare_outputs(got: dict, expected: dict) -> dict:
    """{name: difference} over every output the two models share."""
    results = {}
    for key, value in expected.items():
        if value is None:
            if got.get(key) is not None:
                raise ValueError(f"{key}: torch has none, jax has one")
            continue
        if key in NCHW_KEYS:
            values = value if isinstance(value, tuple) else (value,)
            gots = got[key] if isinstance(got[key], tuple) else (got[key],)
            for i, (g, e) in enumerate(zip(gots, values)):
                name = f"{key}[{i}]" if isinstance(value, tuple) else key
                results[name] = parity_limits.difference(g, _nhwc(e))
        else:
            results[key] = parity_limits.difference(got[key], value.detach().numpy())
    return results


def reference_model(model_config, seed: int = 0, batch: int = 2):
    """A perturbed reference whose scores on `make_images` spread over 35..65.

    Returns (model, normalised float32 images NHWC, calibration info); the images
    are `normalize(make_crops(max(batch, 2), img_size, seed))[:batch]`.
    """
    torch.manual_seed(seed)
    model = HyperIQAReference(model_config)
    perturb(model, seed)
    images = make_images(max(batch, 2), int(model_config.img_size), seed)
    info = calibrate_scores(model, torch.from_numpy(images).permute(0, 3, 1, 2))
    return model, images[:batch], info


def _nchw(crops) -> torch.Tensor:
    """uint8 NHWC crops -> the reference's normalised float32 NCHW input."""
    return torch.from_numpy(normalize(crops)).permute(0, 3, 1, 2)


def load_into_reference(model: HyperIQAReference, state_dict, fmt: str = "auto") -> None:
    """Loads a (foreign) checkpoint into the reference, through the same renames."""
    state_dict = conversion.unwrap(state_dict)
    if fmt == "auto":
        fmt = conversion.detect_format(state_dict)
    renamed = conversion.RENAMERS[fmt](state_dict)
    if model.channels_last_backbone:  # any Swin layout -> timm features_only names.
        backbone = swin_conversion.timm_names(
            {k[len("backbone."):]: v for k, v in renamed.items() if k.startswith("backbone.")})
        renamed = {k: v for k, v in renamed.items() if not k.startswith("backbone.")}
        for key, value in backbone.items():
            renamed["backbone." + re.sub(r"^layers\.(\d+)\.", r"layers_\1.", key)] = value
    out = {k: torch.as_tensor(np.asarray(swin_conversion.to_numpy(v)))
           for k, v in renamed.items()}
    wanted = model.state_dict()
    out = {k: v for k, v in out.items() if k in wanted}
    missing = [k for k in wanted if k not in out and not k.endswith("num_batches_tracked")]
    if missing:
        raise conversion.ConversionError(
            f"checkpoint lacks {len(missing)} key(s) of the reference: {missing[:20]}")
    model.load_state_dict(out, strict=False)


def forward_parity(model_config, *, batch: int = 2, seed: int = 0, checkpoint=None,
                   fmt: str = "auto") -> dict:
    """Differences between the JAX model and the reference, on the same weights and images.

    The images are `reference_model`'s for `seed`; the weights are its calibrated ones,
    or those of `checkpoint` (a file or a state dict), whose scores are then what
    they are on those images.
    """
    jax.config.update("jax_default_matmul_precision", "highest")
    model_config = copy.deepcopy(model_config)
    model_config.dtype = "float32"
    reference, images, info = reference_model(model_config, seed, batch)
    if checkpoint is not None:
        state_dict = (swin_conversion.load_state_dict_file(checkpoint)
                      if isinstance(checkpoint, str) else checkpoint)
        load_into_reference(reference, state_dict, fmt)
        variables = conversion.convert_state_dict(state_dict, model_config, fmt)
    else:
        variables = conversion.convert_state_dict(reference.state_dict(), model_config,
                                                  "reference")
    reference.eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
    model = build_model(model_config)
    got = jax.jit(lambda v, x: model.apply(v, x, return_intermediates=True))(
        variables, jnp.asarray(images))
    results = compare_outputs(got, expected)
    results["_scores"] = {"jax": np.asarray(got["score"]).tolist(),
                          "torch": expected["score"].numpy().tolist(), **info}
    return results


def _flat_torch_params(reference) -> dict:
    return {k: v.detach().clone() for k, v in reference.state_dict().items()}


RELU_NEAR_ZERO = 2e-5


def relu_inputs_near_zero(reference, crops) -> int:
    """How many ReLU inputs of a forward pass lie within RELU_NEAR_ZERO of 0.

    Float32 rounding (about 1e-6 to 1e-5 here) can put such an input on the other side
    of the kink in one framework, which changes the gradient by that element's
    whole contribution: gradients are only comparable tightly when this is 0.
    """
    hyper, attention = reference.hyper, getattr(reference, "attention", None)
    feeding = [getattr(hyper, f"feature_conv_{i}") for i in range(hyper.num_feature_convs)]
    feeding += [getattr(attention, name) for name in ("reduce", "hidden")
                if hasattr(attention, name)]
    count = [0]

    def output_hook(module, inputs, output):
        count[0] += int((output.abs() < RELU_NEAR_ZERO).sum())

    def input_hook(module, inputs):
        count[0] += int((inputs[0].abs() < RELU_NEAR_ZERO).sum())

    handles = [m.register_forward_hook(output_hook) for m in feeding]
    handles += [m.register_forward_pre_hook(input_hook) for m in reference.backbone.modules()
                if isinstance(m, torch.nn.ReLU)]
    try:
        with torch.no_grad():
            reference(_nchw(crops))
    finally:
        for handle in handles:
            handle.remove()
    return count[0]


def train_step_parity(config, *, batch: int = 2, seed: int = 0, steps: int = 3,
                      kink_free_tries: int = 3) -> dict:
    """`steps` training steps in PyTorch, each compared with the two halves of JAX's
    `train.train_step` (`train.loss_and_grads`, then the optimiser) on the same inputs.

    `config` is a full config (model + train); the loss is L1 (the PyTorch original's), dropout,
    drop path and the scale attention's dropout are off, and each step's learning
    rates follow the config's schedule in both. Before each step, at the same
    parameters: the loss, the gradients (the largest over tensors of
    ||jax - torch|| / ||torch|| in the L2 norm: `grad_rel` over the steps whose
    forward pass has no ReLU input near 0, `grad_rel_kinked` over the others, see
    `relu_inputs_near_zero`) and, for ResNet, the updated BatchNorm statistics
    (`batch_stats_rel`, relative to max(|stat| max, 1)). The optimiser
    (`optim.make_optimizer`: global-norm clipping, AdamW with the two learning-rate
    groups) is fed torch's gradients and compared with `clip_grad_norm_` and
    `torch.optim.AdamW` run in float64: `update_diff_in_lr` is the largest difference
    of a step's updates, in units of the group's lr.

    Both frameworks follow torch's trajectory: on their own ones, AdamW's division by
    each gradient element's running magnitude turns rounding-level gradient elements
    into steps of about an lr either way, so the parameters drift apart by that
    much, and at the configs' learning rates float32 parameters cannot even hold
    an update to better than a quarter of an lr (one ulp of a LayerNorm scale near 1
    is 1.2e-7), hence the float64 reference. `relu_near_zero`: the count of each
    step. For Swin models (whose only ReLUs are in the head) up to `kink_free_tries`
    seeds are tried to find weights with no ReLU input near 0 at the first step; a
    ResNet always has some.
    """
    from hyperiqa_jax import train
    from hyperiqa_jax.optim import lr_schedules, make_optimizer

    jax.config.update("jax_default_matmul_precision", "highest")
    model_config = copy.deepcopy(config.model)
    model_config.dtype = "float32"
    model_config.dropout = 0.0
    model_config.drop_path_rate = 0.0
    model_config.attention_dropout = 0.0
    train_config = copy.deepcopy(config.train)
    train_config.loss, train_config.ranking_loss_weight = "l1", 0.0
    lr, ratio, wd = float(train_config.lr), float(train_config.lr_ratio), float(
        train_config.weight_decay)

    tries = 1 if is_resnet(model_config) else max(kink_free_tries, 1)
    for seed_used in range(seed, seed + tries):
        reference, _, info = reference_model(model_config, seed_used, batch)
        crops = make_crops(max(batch, 2), int(model_config.img_size), seed_used)[:batch]
        reference.train()
        near_zero = relu_inputs_near_zero(reference, crops)
        if near_zero == 0:
            break
    labels = np.random.RandomState(seed + 1).uniform(0, 100, batch).astype(np.float32)

    # The reference optimiser, in float64 on a copy of the parameters.
    named = dict(reference.named_parameters())
    masters = {n: p.detach().double().clone() for n, p in named.items()}
    group_of = {n: "backbone" if n.startswith("backbone.") else "head" for n in named}
    optimizer = torch.optim.AdamW(
        [{"params": [m for n, m in masters.items() if group_of[n] == name], "lr": group_lr}
         for name, group_lr in (("backbone", lr), ("head", lr * ratio))],
        betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    schedules = lr_schedules(train_config, steps_per_epoch=steps)

    model = build_model(model_config)
    tx = make_optimizer(train_config, steps_per_epoch=steps)
    grads_fn = jax.jit(functools.partial(train.loss_and_grads, model=model,
                                         train_config=train_config, label_stats=(0.0, 1.0)))
    update_fn = jax.jit(tx.update)
    jax_batch = {"image": jnp.asarray(crops), "score": jnp.asarray(labels)}
    flat = traverse_util.flatten_dict

    def to_jax(tensors) -> dict:  # torch parameters (and buffers) -> JAX variables
        return conversion.convert_state_dict(
            {**_flat_torch_params(reference), **tensors}, model_config, "reference")

    opt_state = tx.init(to_jax({})["params"])
    result = {"loss": 0.0, "loss_value": 0.0, "update_diff_in_lr": 0.0,
              "relu_near_zero": [], "seed": seed_used, "steps": steps,
              "_calibration": info}
    for step in range(steps):
        for group, name in zip(optimizer.param_groups, ("backbone", "head")):
            group["lr"] = float(schedules[name](step))
        result["relu_near_zero"].append(
            relu_inputs_near_zero(reference, crops) if step else near_zero)
        shared = to_jax({})  # torch's parameters and statistics before this step
        out = reference(_nchw(crops))  # train mode: updates the BatchNorm statistics
        loss = (out["score"] - torch.from_numpy(labels)).abs().mean()
        reference.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in named.items()}
        torch_grads = to_jax(grads)["params"]

        jax_loss, jax_grads, jax_stats = grads_fn(shared["params"], shared.get("batch_stats"),
                                                  jax_batch, jax.random.key(0))
        result["loss"] = max(result["loss"], abs(float(jax_loss) - float(loss.detach())))
        result["loss_value"] = max(result["loss_value"], float(loss.detach()))
        # A ReLU input near 0 may fall on either side of the kink: the gradients
        # then differ by its whole contribution.
        key = "grad_rel_kinked" if result["relu_near_zero"][-1] else "grad_rel"
        result[key] = max(result.get(key, 0.0),
                          *(_norm_rel(g, t) for g, t in _pairs(jax_grads, torch_grads)))
        if jax_stats is not None:
            torch_stats = to_jax({})["batch_stats"]
            result["batch_stats_rel"] = max(
                result.get("batch_stats_rel", 0.0),
                *(float(np.abs(np.asarray(j, np.float64) - np.asarray(t, np.float64)).max()
                        / max(np.abs(np.asarray(t)).max(), 1.0))
                  for j, t in _pairs(jax_stats, torch_stats)))

        # Both optimisers fed torch's gradients; the model then takes the float64
        # parameters (rounded), the next step's starting point for both.
        before = {n: m.clone() for n, m in masters.items()}
        for n, master in masters.items():
            master.grad = grads[n].double()
        if train_config.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(masters.values()), float(train_config.grad_clip))
        optimizer.step()
        torch_updates = flat(to_jax({n: masters[n] - before[n] for n in masters})["params"])
        updates, opt_state = update_fn(torch_grads, opt_state, shared["params"])
        for path, update in flat(updates).items():
            group_lr = lr if path[0] == "backbone" else lr * ratio
            diff = np.abs(np.asarray(update, np.float64) - torch_updates[path]).max()
            result["update_diff_in_lr"] = max(result["update_diff_in_lr"],
                                              float(diff) / group_lr)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(masters[n].float())
    return result


def _pairs(a: dict, b: dict):
    """(a leaf, b leaf) of two trees with the same paths."""
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return [(flat_a[path], flat_b[path]) for path in flat_b]


def _norm_rel(got, expected) -> float:
    """||got - expected|| / ||expected|| (L2, in float64)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


def is_resnet(model_config) -> bool:
    return model_config.backbone in RESNET_BACKBONES
