"""The configs every config file starts from; every key and its default is here.

`reference_config(size)` is the PyTorch original's recipe for one Swin size
(docs/models.md); the files in the repository's `configs/` folder are plain
`get_config()` functions that start from it and change what their variant
changes, and a saved run's config is laid over it when read back
(checkpointing.config_from_meta), so runs written before a key existed get its
default.

`demo_config()` is the demo's recipe (`python -m hyperiqa_jax.demo`), a small
E6 model trained from random initialisation on the generated demo data on a
CPU. Its choices, each measured against the alternative on the demo data:

- a local-energy stem (16 learnt 3x3 filters, squared, next to the pixels) and
  no LayerNorm after the patch embedding: distortions change local energy,
  which a linear 4x4 patch plus a per-token LayerNorm hides from the
  mean-pooled HyperIQA heads. The stem's filters start zero-mean, so their
  energy is that of local detail, not of brightness;
- random crop corners on multiples of 8 pixels (`data.crop_step`): JPEG's 8x8
  blocks sit in the same place in every crop and in the grid test crops, so
  block edges are learnable;
- `small_target_init`: generated target-net weights start at 1/sqrt(fan_in)
  and the output weight at zero (with the default init the target net's
  sigmoids saturate and its input gets no gradient);
- 224-pixel crops of the 256-pixel images with patch size 4: stage maps
  56/28/14/7, the layout the HyperIQA heads are built for; a narrow, shallow
  Swin (width 24, one block per stage) and a slimmer hyper network;
- one crop per image per epoch in batches of 8 (more steps helps this
  underfitting model more than less noisy gradients);
- the E6 head (multi-scale fusion and channel attention) with the channel gate
  started near identity (`attention_gate_bias` 5, sigmoid 0.993): the default
  zero bias starts the gate at 0.5, which halves the fused features of a
  random-init model;
- labels standardised for the loss, L1; AdamW with warmup and per-step cosine,
  one learning rate for backbone and heads (random init: the backbone has to
  move as fast as the heads).
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


def reference_config(size="base"):
    """The PyTorch original's recipe: KonIQ-10k, AdamW, per-epoch cosine, 10 epochs of batch 32."""
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


def demo_config():
    """The demo's recipe (`python -m hyperiqa_jax.demo`, configs/demo.py); see the module doc."""
    config = reference_config("tiny")
    config.pretrained_backbone = ""  # random init

    d = config.data
    d.name = "demo"
    d.root = ""  # "" = generate once into ~/.cache/hyperiqa_jax/demo-v3 (or $HYPERIQA_JAX_CACHE/)
    d.resize = None  # the images are 256x256: crop them as they are (resizing blurs distortions)
    d.crop_size = 224
    d.train_crops = 1  # one crop per image per epoch: a batch holds 8 different images
    d.crop_step = 8  # random crop corners on JPEG's 8x8 block grid
    d.test_crops = 9  # a 3x3 grid: corners, edge midpoints and centre (all on the 8-px grid)
    d.eval_protocol = "grid"
    d.max_bad_fraction = 0.0

    m = config.model
    m.img_size = 224
    m.backbone_overrides = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                                patch_size=4, window_size=7, stem_channels=16,
                                patch_norm=False)
    m.drop_path_rate = 0.0
    m.dropout = 0.0
    m.hyper_feature_widths = (128, 128)
    m.attention = "channel"  # E6: multi-scale fusion + channel attention
    m.attention_gate_bias = 5.0  # the gate starts at sigmoid(5) = 0.993, near identity
    m.small_target_init = True

    t = config.train
    t.batch_size = 8
    t.epochs = 26  # 3,042 steps
    t.lr = 7e-4
    t.lr_ratio = 1.0
    t.weight_decay = 0.05
    t.schedule = "warmup_cosine"
    t.warmup_steps = 60
    t.eta_min = 1e-5
    t.grad_clip = 1.0
    t.standardize_labels = True
    t.loss = "l1"
    t.ranking_loss_weight = 0.0
    t.patience = 0
    t.eval_every_epochs = 0  # no evaluation while training: each costs ~25 s of the budget,
    t.final_eval = False     # and the demo evaluates the final model itself afterwards
    t.eval_every_steps = 0
    t.eval_batch_size = 64
    t.max_steps = 0
    t.checkpoint_every_steps = 1000  # and at every epoch end (117 steps)
    t.keep_checkpoints = 2
    t.log_every_steps = 20  # each log waits for the step: fewer keep the CPU busy
    return config
