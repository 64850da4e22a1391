"""Full-model parity: the JAX HyperIQA against `torch_reference.HyperIQAReference`.

Forward: same (perturbed, score-calibrated) weights and images, float32, every
intermediate compared: stage maps, pooled maps, LDA vector, fused map,
hyper_in_feat, every generated target weight and bias, attention, score.

Training step: one step of L1 loss + global-norm clipping + AdamW with the two
learning-rate groups (`hyperiqa_jax.optim.make_optimizer` against
`torch.optim.AdamW`), dropout and drop path off; compares gradients, updated
parameters and (ResNet) the BatchNorm running statistics.

Used by `python -m weights_conversion.validate_parity --config configs/X.py` and the tests.
"""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import traverse_util

from hyperiqa_jax.models import RESNET_BACKBONES, build_model
from weights_conversion import hyperiqa as conversion
from weights_conversion import swin as swin_conversion
from weights_conversion.torch_reference import HyperIQAReference, calibrate_scores, perturb
from weights_conversion.validate_parity import difference

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
NCHW_KEYS = ("stage_maps", "pooled_maps", "fused", "hyper_in_feat")


def make_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Normalised NHWC images that differ in colour, structure and noise level."""
    rng = np.random.RandomState(seed)
    images = []
    for i in range(batch):
        cells = 2 ** (1 + i % 4)  # coarse blocks of different sizes.
        block = rng.rand(cells, cells, 3)
        image = np.kron(block, np.ones((size // cells + 1, size // cells + 1, 1)))[:size, :size]
        image = image + rng.randn(size, size, 3) * 0.04 * (1 + i)
        images.append(np.clip(image, 0.0, 1.0))
    return ((np.stack(images) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


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
                results[name] = difference(g, _nhwc(e))
        else:
            results[key] = difference(got[key], value.detach().numpy())
    return results


def reference_model(model_config, seed: int = 0, batch: int = 2):
    """A perturbed reference whose scores on `make_images` spread over 20..80.

    Returns (model, images NHWC, calibration info).
    """
    torch.manual_seed(seed)
    model = HyperIQAReference(model_config)
    perturb(model, seed)
    size = int(model_config.get("img_size", 224))
    images = make_images(max(batch, 2), size, seed)
    info = calibrate_scores(model, torch.from_numpy(images).permute(0, 3, 1, 2))
    return model, images[:batch], info


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
    """Differences between the JAX model and the reference, on the same weights and images."""
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


def relu_inputs_near_zero(reference, images) -> int:
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
            reference(torch.from_numpy(images).permute(0, 3, 1, 2))
    finally:
        for handle in handles:
            handle.remove()
    return count[0]


def train_step_parity(config, *, batch: int = 2, seed: int = 0, kink_free_tries: int = 3) -> dict:
    """One optimiser step in both frameworks from the same weights and batch.

    `config` is a full config (model + train). Dropout, drop path and the scale
    attention's dropout are switched off. Returns max differences of loss,
    gradients (relative to the largest gradient of each tensor), updated
    parameters (max relative, max in units of the group's lr, and the fraction of
    elements not within 1e-5 relative), update steps (in units of the lr, where
    the gradient's sign is well defined), plus `relu_near_zero`
    (see `relu_inputs_near_zero`). For Swin models (whose only ReLUs are in the
    head) up to `kink_free_tries` seeds are tried to find weights with no ReLU
    input near 0; a ResNet always has some.
    """
    from hyperiqa_jax.optim import make_optimizer

    jax.config.update("jax_default_matmul_precision", "highest")
    model_config = copy.deepcopy(config.model)
    model_config.dtype = "float32"
    model_config.dropout = 0.0
    model_config.drop_path_rate = 0.0
    model_config.attention_dropout = 0.0
    train = config.train
    lr, ratio, wd = float(train.lr), float(train.lr_ratio), float(train.weight_decay)

    tries = 1 if is_resnet(model_config) else max(kink_free_tries, 1)
    for seed_used in range(seed, seed + tries):
        reference, images, info = reference_model(model_config, seed_used, batch)
        reference.train()
        near_zero = relu_inputs_near_zero(reference, images)
        if near_zero == 0:
            break
    labels = np.random.RandomState(seed + 1).uniform(0, 100, batch).astype(np.float32)
    variables = conversion.convert_state_dict(reference.state_dict(), model_config, "reference")

    # PyTorch: L1 loss, clip_grad_norm_, AdamW with a backbone group and a head group.
    backbone = [p for n, p in reference.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in reference.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": lr},
                                   {"params": head, "lr": lr * ratio}],
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    out = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
    loss = (out["score"] - torch.from_numpy(labels)).abs().mean()
    optimizer.zero_grad()
    loss.backward()
    torch_grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters()}
    if train.get("grad_clip", 0):
        torch.nn.utils.clip_grad_norm_(reference.parameters(), float(train.grad_clip))
    optimizer.step()
    torch_after = conversion.convert_state_dict(_flat_torch_params(reference), model_config,
                                                "reference")
    torch_grads = conversion.convert_state_dict(
        {**_flat_torch_params(reference), **torch_grads}, model_config, "reference")["params"]

    # JAX: the project's optimiser.
    model = build_model(model_config)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    tx = make_optimizer(train, steps_per_epoch=1)

    def loss_fn(params):
        outputs, new_state = model.apply({"params": params, **state}, jnp.asarray(images),
                                         train=True, mutable=list(state),
                                         rngs={"dropout": jax.random.key(seed)})
        return jnp.abs(outputs["score"] - labels).mean(), new_state

    @jax.jit
    def step(params):
        (value, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return value, grads, optax.apply_updates(params, updates), new_state

    jax_loss, jax_grads, jax_params, jax_state = step(params)

    flat = lambda tree: traverse_util.flatten_dict(tree)
    before, after_t, after_j = flat(params), flat(torch_after["params"]), flat(jax_params)
    grads_t, grads_j = flat(torch_grads), flat(jax_grads)
    result = {"loss": abs(float(jax_loss) - float(loss.detach())),
              "loss_value": float(loss.detach()), "grad_rel": 0.0, "param_rel": 0.0,
              "update_in_lr": 0.0, "ambiguous_fraction": 0.0, "relu_near_zero": near_zero,
              "seed": seed_used, "_calibration": info}
    ambiguous = total = outside = 0
    for path in before:
        group_lr = lr if path[0] == "backbone" else lr * ratio
        g_t, g_j = np.asarray(grads_t[path]), np.asarray(grads_j[path])
        grad_error = np.abs(g_j - g_t).max()
        result["grad_rel"] = max(result["grad_rel"],
                                 float(grad_error / max(np.abs(g_t).max(), 1e-12)))
        p0, p_t, p_j = (np.asarray(x, np.float64) for x in
                        (before[path], after_t[path], after_j[path]))
        # Relative difference beyond what a fraction of one lr step explains: AdamW's
        # first step lr * g / (|g| + eps) is ill-conditioned where |g| ~ eps.
        rel = np.abs(p_j - p_t) / np.maximum(np.abs(p_t), 1e-12)
        result["param_rel"] = max(result["param_rel"], float(rel.max()))
        result["param_diff_in_lr"] = max(result.get("param_diff_in_lr", 0.0),
                                         float(np.abs(p_j - p_t).max() / group_lr))
        within = np.abs(p_j - p_t) <= 1e-5 * np.abs(p_t)
        outside += int((~within).sum())
        # AdamW's first step moves by lr * g / (|g| + eps): its sign is only defined where
        # the gradient is well above the two frameworks' gradient difference.
        defined = np.abs(g_t) > 10 * grad_error + 1e-7
        ambiguous += int((~defined).sum())
        total += defined.size
        if defined.any():
            step_diff = np.abs((p_j - p0) - (p_t - p0))[defined].max() / group_lr
            result["update_in_lr"] = max(result["update_in_lr"], float(step_diff))
    result["ambiguous_fraction"] = ambiguous / max(total, 1)
    result["outside_rel_1e-5_fraction"] = outside / max(total, 1)
    if "batch_stats" in state:
        stats_t = flat(torch_after["batch_stats"])
        stats_j = flat(jax_state["batch_stats"])
        result["batch_stats_abs"] = max(
            float(np.abs(np.asarray(stats_j[p]) - np.asarray(stats_t[p])).max()) for p in stats_t)
    return result


def is_resnet(model_config) -> bool:
    return model_config.backbone in RESNET_BACKBONES
