"""ResNet-50 backbone: PyTorch BatchNorm semantics and the torchvision layout."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hyperiqa_jax.models.resnet import BatchNorm, ResNet50


def test_batchnorm_matches_pytorch_in_train_and_eval():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 5, 4, 6).astype(np.float32) * 2 + 1
    torch_bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
        torch_bn.bias.uniform_(-0.5, 0.5)
    module = BatchNorm()
    variables = module.init(jax.random.key(0), jnp.asarray(x), train=False)
    params = {"scale": jnp.asarray(torch_bn.weight.detach().numpy()),
              "bias": jnp.asarray(torch_bn.bias.detach().numpy())}
    stats = variables["batch_stats"]

    torch_bn.train()
    expected = torch_bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got, updated = module.apply({"params": params, "batch_stats": stats}, jnp.asarray(x),
                                train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, expected.detach().numpy(), atol=1e-5)
    # Running variance takes the unbiased batch variance, as in PyTorch.
    np.testing.assert_allclose(updated["batch_stats"]["mean"], torch_bn.running_mean.numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["var"], torch_bn.running_var.numpy(),
                               atol=2e-6)  # measured <= 1.2e-7 (variances up to 1.4)

    torch_bn.eval()
    expected = torch_bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = module.apply({"params": params, **updated}, jnp.asarray(x), train=False)
    np.testing.assert_allclose(got, expected.detach().numpy(), atol=1e-5)


def test_resnet50_layout_and_stages():
    model = ResNet50()
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    params = shapes["params"]
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    assert count == 23_508_032  # torchvision resnet50 without its fc layer.
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert params["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
    assert "downsample_conv" not in params["layer1_1"]
    assert set(shapes["batch_stats"]["bn1"]) == {"mean", "var"}
    out = jax.eval_shape(lambda v, x: model.apply(v, x), shapes,
                         jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert [o.shape for o in out] == [(2, 56, 56, 256), (2, 28, 28, 512), (2, 14, 14, 1024),
                                      (2, 7, 7, 2048)]
