"""PyTorch reference of the HyperIQA family (NCHW, timm backbones), as docs/models.md describes it.

This is what the JAX model (`hyperiqa_jax.models`) is checked against, and its
`state_dict()` is checkpoint format (a) of `weights_conversion.hyperiqa`. Its
module names mirror the JAX parameter tree:

    backbone.*                       timm `features_only` Swin (`layers_{i}...`) or ResNet-50
    lda.conv_{0,1,2}, lda.fc_{0..3}  local distortion aware vector
    attention.reduce / .expand       channel attention (squeeze-excitation)
    attention.hidden / .logits       scale attention (SMART-IQA)
    hyper.feature_conv_{0,1,2}       1x1 convs -> hyper_in_feat
    hyper.fc{1..4}_weight_conv, hyper.fc{1..5}_bias_fc, hyper.fc5_weight_fc

The target network uses grouped convolutions over the batch, as the original
PyTorch HyperIQA does.
"""

import timm
import torch
import torch.nn.functional as F
from torch import nn

HYPER_FEATURE_WIDTHS = {"resnet": (1024, 512), "swin": (512, 256)}


def _get(config, key, default):
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def create_backbone(model_config) -> nn.Module:
    """timm features_only backbone returning the four stage maps."""
    name = model_config.backbone
    if name == "resnet50":
        return timm.create_model("resnet50", pretrained=False, features_only=True,
                                 out_indices=(1, 2, 3, 4))
    overrides = dict(_get(model_config, "backbone_overrides", None) or {})
    overrides.pop("dtype", None)
    overrides.setdefault("img_size", _get(model_config, "img_size", 224))
    overrides.setdefault("drop_path_rate", _get(model_config, "drop_path_rate", 0.0))
    for key in ("depths", "num_heads"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return timm.create_model(name, pretrained=False, features_only=True,
                             out_indices=(0, 1, 2, 3), **overrides)


class LocalDistortionAware(nn.Module):
    def __init__(self, stage_channels, conv_widths=(16, 32, 64), out_sizes=(16, 16, 16, 176)):
        super().__init__()
        self.conv_widths = tuple(conv_widths)
        for i, width in enumerate(conv_widths):
            setattr(self, f"conv_{i}", nn.Conv2d(stage_channels[i], width, 1, bias=False))
        for i, out_size in enumerate(out_sizes):
            # Spatial size after the 7/7 pool at 224: 8x8, 4x4, 2x2, 1x1.
            spatial = (56 // 2 ** i // 7) ** 2
            width = conv_widths[i] if i < len(conv_widths) else stage_channels[i]
            setattr(self, f"fc_{i}", nn.Linear(width * spatial, out_size))

    def forward(self, stage_maps):
        parts = []
        for i, x in enumerate(stage_maps):
            if i < len(self.conv_widths):
                x = getattr(self, f"conv_{i}")(x)
            x = F.avg_pool2d(x, 7, stride=7)
            parts.append(getattr(self, f"fc_{i}")(x.reshape(x.shape[0], -1)))
        return torch.cat(parts, dim=1)


class ChannelAttention(nn.Module):
    def __init__(self, channels, reduction=4):
        super().__init__()
        self.reduce = nn.Linear(channels, channels // reduction)
        self.expand = nn.Linear(channels // reduction, channels)

    def forward(self, x):
        weights = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean(dim=(2, 3))))))
        return x * weights[:, :, None, None], weights


class ScaleAttention(nn.Module):
    def __init__(self, deepest_channels, num_scales=4, hidden=256, dropout=0.5):
        super().__init__()
        self.hidden = nn.Linear(deepest_channels, hidden)
        self.dropout = nn.Dropout(dropout)
        self.logits = nn.Linear(hidden, num_scales)

    def forward(self, pooled_maps, deepest_map):
        context = F.adaptive_avg_pool2d(deepest_map, 1).flatten(1)
        weights = torch.softmax(self.logits(self.dropout(F.relu(self.hidden(context)))), dim=1)
        fused = torch.cat([m * weights[:, i].view(-1, 1, 1, 1)
                           for i, m in enumerate(pooled_maps)], dim=1)
        return fused, weights


class HyperNetwork(nn.Module):
    def __init__(self, in_channels, feature_widths=(512, 256), hyper_in_channels=112,
                 target_in_size=224, target_fc_sizes=(112, 56, 28, 14), feature_size=7,
                 dropout=0.0):
        super().__init__()
        widths = (in_channels, *feature_widths, hyper_in_channels)
        for i in range(len(widths) - 1):
            setattr(self, f"feature_conv_{i}", nn.Conv2d(widths[i], widths[i + 1], 1))
        self.num_feature_convs = len(widths) - 1
        self.dropout = nn.Dropout(dropout)
        self.sizes = (target_in_size, *target_fc_sizes)
        self.feature_size = feature_size
        for i in range(len(target_fc_sizes)):
            channels = self.sizes[i] * self.sizes[i + 1] // feature_size ** 2
            setattr(self, f"fc{i + 1}_weight_conv",
                    nn.Conv2d(hyper_in_channels, channels, 3, padding=1))
            setattr(self, f"fc{i + 1}_bias_fc", nn.Linear(hyper_in_channels, self.sizes[i + 1]))
        last = len(target_fc_sizes) + 1
        setattr(self, f"fc{last}_weight_fc", nn.Linear(hyper_in_channels, self.sizes[-1]))
        setattr(self, f"fc{last}_bias_fc", nn.Linear(hyper_in_channels, 1))

    def forward(self, fused):
        x = fused
        for i in range(self.num_feature_convs):
            x = F.relu(getattr(self, f"feature_conv_{i}")(x))
        hyper_in_feat = x
        x = self.dropout(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        batch = x.shape[0]
        weights, biases = [], []
        layers = len(self.sizes) - 1
        for i in range(layers):
            fan_in, fan_out = self.sizes[i], self.sizes[i + 1]
            w = getattr(self, f"fc{i + 1}_weight_conv")(x)  # [B, C', 7, 7]
            weights.append(w.reshape(batch, fan_out, fan_in))  # row-major NCHW view
            biases.append(getattr(self, f"fc{i + 1}_bias_fc")(pooled))
        weights.append(getattr(self, f"fc{layers + 1}_weight_fc")(pooled).view(batch, 1, -1))
        biases.append(getattr(self, f"fc{layers + 1}_bias_fc")(pooled))
        return hyper_in_feat, weights, biases


def target_fc(x, weight, bias):
    """Per-image Linear via a grouped 1x1 conv: x [B, in], weight [B, out, in], bias [B, out]."""
    batch, fan_out, fan_in = weight.shape
    out = F.conv2d(x.reshape(1, batch * fan_in, 1, 1),
                   weight.reshape(batch * fan_out, fan_in, 1, 1),
                   bias.reshape(batch * fan_out), groups=batch)
    return out.reshape(batch, fan_out)


class HyperIQAReference(nn.Module):
    """The whole model; forward(images NCHW) -> dict like the JAX model's (NCHW maps)."""

    def __init__(self, model_config):
        super().__init__()
        self.multi_scale = bool(model_config.multi_scale)
        self.attention_kind = str(model_config.attention)
        self.feature_size = int(model_config.feature_size)
        kind = "resnet" if model_config.backbone == "resnet50" else "swin"
        self.channels_last_backbone = kind == "swin"  # timm Swin features are NHWC.
        self.backbone = create_backbone(model_config)
        stage_channels = tuple(self.backbone.feature_info.channels())
        lda_sizes = (16, 16, 16, int(model_config.target_in_size) - 48)
        self.lda = LocalDistortionAware(stage_channels, (16, 32, 64), lda_sizes)
        fused_channels = sum(stage_channels) if self.multi_scale else stage_channels[-1]
        if self.attention_kind == "channel":
            self.attention = ChannelAttention(fused_channels)
        elif self.attention_kind == "scale":
            self.attention = ScaleAttention(stage_channels[-1], len(stage_channels),
                                            dropout=_get(model_config, "attention_dropout", 0.5))
        widths = _get(model_config, "hyper_feature_widths", None) or HYPER_FEATURE_WIDTHS[kind]
        self.hyper = HyperNetwork(fused_channels, tuple(widths),
                                  int(model_config.hyper_in_channels),
                                  int(model_config.target_in_size),
                                  tuple(model_config.target_fc_sizes), self.feature_size,
                                  float(model_config.dropout))
        self.target_dropout = nn.Dropout(float(model_config.dropout))

    def forward(self, images):
        stage_maps = self.backbone(images)
        if self.channels_last_backbone:
            stage_maps = [m.permute(0, 3, 1, 2).contiguous() for m in stage_maps]
        target_in_vec = self.lda(stage_maps)

        size = (self.feature_size, self.feature_size)
        used = stage_maps if self.multi_scale else stage_maps[-1:]
        pooled_maps = [F.adaptive_avg_pool2d(m, size) for m in used]
        attention = None
        if self.attention_kind == "scale":
            fused, attention = self.attention(pooled_maps, stage_maps[-1])
        else:
            fused = torch.cat(pooled_maps, dim=1)
            if self.attention_kind == "channel":
                fused, attention = self.attention(fused)

        hyper_in_feat, weights, biases = self.hyper(fused)
        q = target_in_vec
        for i in range(len(weights) - 1):
            q = torch.sigmoid(target_fc(q, weights[i], biases[i]))
            if i < len(weights) - 2:
                q = self.target_dropout(q)
        score = target_fc(q, weights[-1], biases[-1])[:, 0]

        out = {"score": score, "attention": attention, "stage_maps": tuple(stage_maps),
               "pooled_maps": tuple(pooled_maps), "target_in_vec": target_in_vec,
               "fused": fused, "hyper_in_feat": hyper_in_feat}
        for i, (w, b) in enumerate(zip(weights, biases)):
            out[f"target_fc{i + 1}_weight"] = w
            out[f"target_fc{i + 1}_bias"] = b
        return out


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Moves every parameter (and BatchNorm running statistic) away from its init, reproducibly.

    Fresh heads give almost the same score for every image; perturbed ones do not,
    so a wrong reshape order cannot hide under the tolerance.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * scale)
        for name, buffer in sorted(model.named_buffers()):
            if name.endswith("running_mean"):
                buffer.add_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buffer.mul_(torch.empty(buffer.shape).uniform_(0.5, 2.0, generator=generator))


# The range `calibrate_scores` maps the scores of its images onto by default.
CALIBRATED_SCORES = (35.0, 65.0)


def calibrate_scores(model: HyperIQAReference, images, low: float = CALIBRATED_SCORES[0],
                     high: float = CALIBRATED_SCORES[1], preactivation_std: float = 2.0) -> dict:
    """Rescales the target-net generators so the scores of `images` spread from `low` to `high`.

    Perturbed heads saturate the target net's sigmoids (every image then gets the
    same score, and a calibration that stretches that tiny spread would amplify
    float32 noise). So, layer by layer, the generators of W_i and b_i are scaled
    together so the pre-activations W_i q + b_i have std `preactivation_std`.
    Last, score = W5 q + b5 is linear in fc5_weight_fc / fc5_bias_fc: scaling both
    by a and adding c to b5's bias maps s -> a s + c exactly.
    Returns the raw score range before the last step and its scale a.
    """
    was_training = model.training
    model.eval()
    hyper = model.hyper
    layers = len(hyper.sizes) - 1
    with torch.no_grad():
        for i in range(1, layers + 1):
            out = model(images)
            q = out["target_in_vec"]
            for j in range(1, i + 1):
                pre = target_fc(q, out[f"target_fc{j}_weight"], out[f"target_fc{j}_bias"])
                q = torch.sigmoid(pre)
            factor = preactivation_std / max(float(pre.std()), 1e-12)
            for name in (f"fc{i}_weight_conv", f"fc{i}_bias_fc"):
                layer = getattr(hyper, name)
                layer.weight.mul_(factor)
                layer.bias.mul_(factor)
        scores = model(images)["score"]
        raw_low, raw_high = float(scores.min()), float(scores.max())
        a = (high - low) / max(raw_high - raw_low, 1e-12)
        c = low - a * raw_low
        for name in (f"fc{layers + 1}_weight_fc", f"fc{layers + 1}_bias_fc"):
            layer = getattr(hyper, name)
            layer.weight.mul_(a)
            layer.bias.mul_(a)
        getattr(hyper, f"fc{layers + 1}_bias_fc").bias.add_(c)
    model.train(was_training)
    return {"raw_min": raw_low, "raw_max": raw_high, "scale": a}
