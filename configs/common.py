"""Shared pieces of the configs: the seed's recipe (docs/models.md) for one model size.

Every config file in this folder is a plain `get_config()` that starts from
`seed_config(...)` and changes what its variant changes.
"""

import ml_collections

# Per size: timm backbone name, stochastic depth rate, dropout of the hyper/target nets.
SWIN_SIZES = {
    "tiny": ("swin_tiny_patch4_window7_224", 0.2, 0.3),
    "small": ("swin_small_patch4_window7_224", 0.25, 0.35),
    "base": ("swin_base_patch4_window7_224", 0.3, 0.4),
}


def model_config(size="base"):
    """The E6 model (multi-scale + channel attention) with a Swin backbone of `size`."""
    backbone, drop_path_rate, dropout = SWIN_SIZES[size]
    m = ml_collections.ConfigDict()
    m.backbone = backbone          # a timm Swin name, or "resnet50" (original HyperIQA).
    m.backbone_overrides = ml_collections.ConfigDict()  # e.g. embed_dim / depths for the demo.
    m.img_size = 224
    m.drop_path_rate = drop_path_rate
    m.dropout = dropout            # after hyper_in_feat and between target-net layers.
    m.multi_scale = True           # False: stage 3 alone (ablation A2).
    m.attention = "channel"        # "channel" (E6), "scale" (SMART-IQA release) or "none" (A1).
    m.hyper_in_channels = 112
    m.target_in_size = 224
    m.target_fc_sizes = (112, 56, 28, 14)
    m.feature_size = 7
    # Compute dtype of matmuls and convolutions; parameters, LayerNorm statistics, softmax,
    # loss and optimiser stay float32. "auto": bfloat16 on a GPU or TPU, float32 on the CPU.
    m.dtype = "auto"
    m.kernels = "auto"             # "auto", "cpu" or "generic" (models/cpu_kernels.py).
    m.remat = "none"               # "block": recompute each block in the backward (less memory).
    m.hyper_feature_widths = ()    # 1x1 convs before hyper_in_feat; () = (512, 256) for Swin,
                                   # (1024, 512) for ResNet-50 (the original HyperIQA).
    m.attention_dropout = 0.5      # scale attention's dropout (the SMART-IQA release).
    m.attention_gate_bias = 0.0    # channel gate's initial logit bias; 0 = PyTorch's (gate 0.5),
                                   # the demo's 5 starts the gate near identity (0.993).
    m.small_target_init = False    # generated target-net weights start small (the demo's choice).
    return m


def seed_config(size="base"):
    """The seed's full recipe: KonIQ-10k, AdamW, per-epoch cosine, 10 epochs of batch 32."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config(size)
    # A converted backbone (python -m weights_conversion.convert_timm ...); "" = random init.
    config.pretrained_backbone = ""

    config.data = ml_collections.ConfigDict()
    config.data.name = "koniq10k"
    config.data.root = ""          # folder holding the data set's published files.
    config.data.label = ""         # label column; "" = the data set's default (KonIQ: MOS_zscore).
    config.data.train_split = "train"
    config.data.test_split = "test"
    config.data.resize = (512, 384)  # (height, width), as PyTorch Resize((512, 384)).
    config.data.crop_size = 224
    config.data.train_crops = 20   # crops per image per epoch.
    config.data.test_crops = 20
    config.data.eval_protocol = "random"  # "random" (seeded), "center" or "grid".
    config.data.max_bad_fraction = 0.01   # abort when more images than this fail to decode.
    config.data.num_workers = 2           # decoding threads per process (per worker process).
    config.data.worker_processes = -1     # decoding processes; -1: none on the CPU backend,
                                          # else one per spare core (at most 16); 0: threads only.
    config.data.mix_images = 16           # images whose crops are shuffled together.
    config.data.random_flip = True
    config.data.crop_step = 1             # random crop corners on multiples of this.
    config.data.prefetch = 2
    config.data.decode_draft = False      # reduced-scale JPEG decode (large photos, e.g. SPAQ).
    config.data.tfds_dir = ""  # "" = read the files under root; else a build_tfds data_dir.

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32   # global batch, split over all devices.
    config.train.epochs = 10
    config.train.lr = 5e-7         # backbone learning rate.
    config.train.lr_ratio = 10.0   # every other parameter: lr * lr_ratio.
    config.train.weight_decay = 2e-4
    config.train.schedule = "cosine_epoch"  # PyTorch CosineAnnealingLR stepped per epoch,
    config.train.eta_min = 1e-6             # or "warmup_cosine" (per step).
    config.train.warmup_steps = 0
    config.train.grad_clip = 1.0
    config.train.ranking_loss_weight = 0.0  # pairwise hinge loss weight (alpha); 0 = L1 only.
    config.train.ranking_margin = 0.1
    config.train.patience = 5      # early stopping on test SRCC, in evaluations.
    config.train.eval_every_epochs = 1
    config.train.checkpoint_every_steps = 1000
    config.train.keep_checkpoints = 2
    config.train.log_every_steps = 50     # the host waits for the step only at these steps.
    config.train.stop_check_every_steps = 10  # multi-process: agree on SIGTERM every N steps.
    config.train.max_steps = 0            # > 0: stop after this many steps (schedule unchanged).
    config.train.eval_every_steps = 0     # > 0: also evaluate every N steps.
    config.train.eval_batch_size = 0      # 0: same as batch_size.
    config.train.standardize_labels = False  # train on (y - mean) / std of the train labels.
    config.train.loss = "l1"              # "l1" or "smooth_l1".
    config.train.final_eval = True        # evaluate after the last step.
    return config
