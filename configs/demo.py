r"""Demo: a small Swin HyperIQA trained from scratch on the generated demo data, on CPU.

    python -m hyperiqa_jax.demo                      # generate data, train, evaluate
    python -m hyperiqa_jax.train --config=configs/demo.py --workdir=runs/demo

The demo data set (hyperiqa_jax/data/demo.py) holds 256x256 crops of the
photographs bundled with scikit-image under six distortions at four levels,
labelled with SSIM x 100; train and test references never share a photograph.

Recipe (for a random-init model on 2 CPU cores; see "Measured" below):
- labels standardised for the loss (the network's raw output starts near 0.1;
  predicting 0-100 directly would spend the run growing the output layer);
- 224-pixel crops of the 256-pixel images with patch size 4: stage maps
  56/28/14/7, the layout the HyperIQA heads are built for (their 7x7 pools
  need a 7x7 stage 3), and each crop sees most of the image, which matters for
  global distortions (contrast, darkening) whose SSIM is a whole-image score;
- a narrow, shallow Swin (width 24, one block per stage) and a slimmer hyper
  network, so a step costs ~1 GFLOP per image;
- L1 on the standardised labels (the low-SSIM noise images dominate an
  L2-like loss), no ranking loss, no channel attention;
- AdamW with warmup and per-step cosine, 2e-3 for backbone and heads alike
  (random init: the backbone has to move as fast as the heads).

Measured (2 CPU cores, quiet, 2026-11-27): 3 min 44 s wall, test SRCC 0.08,
PLCC 0.03 at 504 steps; a random-init HyperIQA barely learns in this budget.
The oracle "mean train label of the image's distortion and level" reaches
test SRCC 0.84 on this data set (v2).
"""

from configs import common


def get_config():
    config = common.seed_config("tiny")
    config.pretrained_backbone = ""  # random init

    d = config.data
    d.name = "demo"
    d.root = ""  # "" = generate (once) into $HYPERIQA_JAX_CACHE/demo or ~/.cache/hyperiqa_jax.
    d.resize = None  # the images are 256x256: crop them as they are (resizing blurs distortions)
    d.crop_size = 224
    d.train_crops = 2
    d.test_crops = 4
    d.eval_protocol = "grid"
    d.max_bad_fraction = 0.0

    m = config.model
    m.img_size = 224
    m.backbone_overrides = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                                patch_size=4, window_size=7)
    m.drop_path_rate = 0.0
    m.dropout = 0.0
    m.hyper_feature_widths = (128, 128)
    m.attention = "none"  # the channel gate's sigmoid halves an already weak signal at init

    t = config.train
    t.batch_size = 16
    t.epochs = 6
    t.lr = 2e-3
    t.lr_ratio = 1.0
    t.weight_decay = 0.05
    t.schedule = "warmup_cosine"
    t.warmup_steps = 30
    t.eta_min = 1e-5
    t.grad_clip = 1.0
    t.standardize_labels = True
    t.loss = "l1"
    t.ranking_loss_weight = 0.0
    t.patience = 0
    t.eval_every_epochs = 2  # an evaluation costs ~15 s of the time budget
    t.eval_every_steps = 0
    t.eval_batch_size = 64
    t.max_steps = 0
    t.checkpoint_every_steps = 200
    t.keep_checkpoints = 2
    t.log_every_steps = 10
    return config
