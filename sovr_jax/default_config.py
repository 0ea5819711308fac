"""The default config and the schema of every config: SOVR, PreActResNet-18, CIFAR-10, the
common PGD-AT recipe. ``configs/default.py`` returns it; every config file starts from it.

    python -m sovr_jax.main --config configs/default.py --workdir runs/sovr
    python -m sovr_jax.main --config configs/default.py:trades --workdir runs/trades
    python -m sovr_jax.main --config configs/default.py --config.method=mart \
        --config.train.epochs=5 --workdir runs/mart5

The optional argument after ':' picks the method. Every config file in configs/ starts from
``get_config`` and overrides fields; ``sovr_jax.config_lib.validate`` refuses unknown keys and
out-of-range values.
Recipe (../shared/docs/method.md): SGD, momentum 0.9, lr 0.1, weight decay 5e-4,
batch 128, 110 epochs with lr x0.1 at epochs 100 and 105, pad-4 crop + flip,
PGD-10 at eps 8/255 (step 2/255) with BatchNorm running statistics.
"""

import ml_collections


def get_config(method: str = "sovr") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = method or "sovr"
  c.seed = 0
  # Compute dtype of the model ("float32" or "bfloat16"); parameters, the
  # optimizer and the losses are always float32.
  c.precision = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"          # tfds: cifar10 | cifar100 | svhn_cropped | mnist; embedded:
                                   # mnist5k | digits; image_folder: any label
  c.data.source = "tfds"           # tfds | image_folder | embedded | synthetic (benchmarks)
  c.data.data_dir = ""             # TFDS data_dir ("" = TFDS default).
  c.data.download = True           # tfds: fetch a data set that is not prepared (README).
  c.data.path = ""                 # image_folder: folder or .tar.gz of split/class/*.jpg
  c.data.cache_dir = ""            # decoded image-folder cache ("" = ~/.cache/sovr_jax).
  c.data.val_size = 1000           # held out from train to choose checkpoints.
  c.data.num_train = 0             # 0 = all (after the validation split).
  c.data.num_test = 0              # 0 = all.
  c.data.crop_pad = 4              # random crop after zero padding; 0 = off.
  c.data.flip = True               # random horizontal flip.

  c.model = ml_collections.ConfigDict()
  c.model.name = "preact_resnet18"  # preact_resnet18 | resnet18 | wrn34_10 | wrn28_10 | small_cnn
  c.model.width = 1.0               # channel multiplier (tiny models for tests).

  # The training attack.
  c.attack = ml_collections.ConfigDict()
  c.attack.norm = "linf"           # linf | l2
  c.attack.eps = 8 / 255
  c.attack.step_size = 2 / 255
  c.attack.num_steps = 10
  c.attack.init = "auto"           # auto (method's own) | uniform | normal | zero
  # BatchNorm during the attack: "eval" = running statistics, no update
  # (PyTorch model.eval(), the field's common choice); "batch" = batch
  # statistics without update.
  c.attack.bn_mode = "eval"
  # Fold eval-mode BatchNorms into the convolutions before them during the attack
  # (models.common.conv_bn; every model but SmallCNN, bn_mode "eval"). The same
  # function up to rounding: a speed option, off until it pays on the card (docs/performance.md).
  c.attack.fold_bn = False

  c.sovr = ml_collections.ConfigDict()
  c.sovr.ovr_fraction = 0.4        # rho: fraction of each batch switched to OVR. Open
  #                                  (method.md): our choice until the GPU sweep; the CPU-scale
  #                                  sweep of docs/results.md leans to 0.2 within noise.
  c.sovr.margin_on = "adv"         # margins for the selection: adv | clean (open).
  c.sovr.ovr_reduce = "sum"        # OVR over classes: sum | mean (open).

  c.trades = ml_collections.ConfigDict()
  c.trades.beta = 6.0

  c.mart = ml_collections.ConfigDict()
  c.mart.beta = -1.0               # -1 = Wang et al.'s for the model: 6 for WRN, 5 otherwise.

  c.mail = ml_collections.ConfigDict()
  c.mail.bias = -1.5
  c.mail.slope = 1.0
  c.mail.beta = 6.0                # MAIL-TRADES's KL weight: TRADES's 6 (our choice; MAIL's
  #                                  train.py has one --beta, 5, for its TRADES and MART forms).
  c.mail.start_epoch = -1          # -1 = 75 % of train.epochs (75 of 100 in MAIL).

  c.gairat = ml_collections.ConfigDict()
  c.gairat.lam = -1.0
  c.gairat.start_epoch = -1        # -1 = from the middle epoch (0-based 59 of 120 in GAIRAT).

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128         # global batch, split over all devices.
  c.train.epochs = 110
  c.train.lr = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 5e-4
  c.train.schedule = "piecewise"   # piecewise | cosine | constant
  c.train.lr_boundaries = (100, 105)  # epochs, for piecewise.
  c.train.lr_decay = 0.1
  c.train.warmup_epochs = 0
  c.train.log_every_steps = 50
  c.train.steps_per_dispatch = 1   # >1: that many steps per jit call (lax.scan).
  # The clean_acc metric costs an extra eval-mode forward per step (1 of 23 forward
  # equivalents of PGD-10) where the method needs no clean logits; False drops it.
  c.train.clean_acc_metric = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 1          # validation clean + PGD-20 (chooses the best checkpoint).
  c.eval.batch_size = 500
  c.eval.pgd_steps = 20
  c.eval.step_size = 0.0           # 0 = eps / 4 (2/255 at 8/255).
  c.eval.cw_steps = 20
  c.eval.margin_examples = 2000    # training examples for the margin histogram.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep = 2            # latest checkpoints kept (>= 2 allows falling back).
  return c


def shrink(c: ml_collections.ConfigDict, attack_steps: int = 3) -> ml_collections.ConfigDict:
  """The quick local mode of any config (tests and smoke runs): 256 train / 64 val / 64 test
  examples, batch 32, 2 epochs (lr x0.1 after the first), PGD-``attack_steps`` in training
  and evaluation."""
  c.data.val_size = 64
  c.data.num_train = 256
  c.data.num_test = 64
  c.attack.num_steps = attack_steps
  c.train.batch_size = 32
  c.train.epochs = 2
  c.train.lr = 0.05
  c.train.lr_boundaries = (1,)
  c.train.log_every_steps = 4
  c.eval.batch_size = 64
  c.eval.pgd_steps = attack_steps
  c.eval.cw_steps = attack_steps
  c.eval.margin_examples = 64
  return c
