"""The reproduction study: PreActResNet-18 on CIFAR-10 (JPEG copy), one schedule for all methods.

    python -m sovr_jax.main --config configs/study.py:sovr --workdir runs/study/sovr_s0
    python -m sovr_jax.main --config configs/study.py:pgd_at,full,60 --workdir runs/pgd_at_60
    python -m sovr_jax.main --config configs/study.py:mail_at,tiny --workdir /tmp/mail_tiny
    python -m scripts.study --scale full --runs pgd_at,sovr --seeds 0,1,2 ...   # every cell

The argument after ':' is ``METHOD[,SCALE[,EPOCHS]]``:
  full  (default) the real schedule, docs/results.md: full-width PreActResNet-18 on the 49,000
        training images, bfloat16 compute, batch 512, lr 0.4 (the recipe's 0.1 at batch 128
        times 512 / 128: linear scaling for SGD, Goyal et al. 2017, which keeps the recipe's
        lr and weight decay per epoch; our choice, docs/results.md), 1 warm-up epoch, 36
        epochs with lr x0.1 at 75 % and 90 % of them (epochs 27 and 32: the MART/MAIL
        boundaries, 75 and 90 of 100, scaled), PGD-10 at eps 8/255 with step 2/255. MAIL
        reweights from 75 %, GAIRAT from its middle epoch (their recipes: docs/results.md).
        EPOCHS lengthens it with the same shape (``full,60``: boundaries 45, 54).
        36 epochs is what one GPU session allows (docs/results.md: about 9.5 minutes for two
        cells sharing an H100/H200, of which about 6.5 for training at the ~12,000 images/s
        that an H200 gave four cells together, the rest for AutoAttack on 10,000 test points).
  gpu   the first GPU study's 8 epochs at lr 0.2 (0.1 times sqrt(512 / 128)), boundaries 6
        and 7, the same settings otherwise; its figures were trained with the warm-up bug
        (docs/results.md), kept for reference.
  cpu   a 1/8-width network (175k parameters) on 5,000 training images for 6 epochs, PGD-10,
        float32, batch 128, lr 0.1 (x0.1 at epoch 5), test on 1,000: a CIFAR model trained
        adversarially in minutes on a 2-core CPU.
  tiny  a 1/4-width SmallCNN on 256 images for 2 epochs, PGD-2: CPU smoke tests of the study
        (its driver, scripts/gpu_study.sh, the figures), not of the architecture.

The data is ../shared/data/cifar10-jpeg.tar.gz (a folder or tarball of train|test/<class>/*.jpg);
pass --config.data.path=... when it lives elsewhere (the GPU script carries a copy).
"""

import math

from sovr_jax import default_config

SCALES = ("full", "gpu", "cpu", "tiny")
CIFAR10_JPEG = "../shared/data/cifar10-jpeg.tar.gz"
FULL_EPOCHS = 36


def get_config(arg: str = "sovr"):
  method, scale, epochs, *rest = ((arg or "sovr").split(",") + ["", ""])[:3] + [None]
  del rest
  scale = scale or "full"
  if scale not in SCALES:
    raise ValueError(f"Unknown study scale {scale!r} in {arg!r}; valid: {SCALES} "
                     f"(e.g. configs/study.py:{method or 'sovr'},full).")
  if epochs and scale != "full":
    raise ValueError(f"An epoch count ({epochs}) applies to the full scale only: "
                     f"configs/study.py:{method},full,{epochs}.")
  c = default_config.get_config(method)
  c.data.name = "cifar10"           # checks the folder's class list, CIFAR-10's mean/std.
  c.data.source = "image_folder"
  c.data.path = CIFAR10_JPEG
  c.data.val_size = 1000            # 49,000 train / 1,000 val (chooses "best") / 10,000 test.
  c.eval.margin_examples = 2000
  if scale in ("full", "gpu"):
    c.precision = "bfloat16"
    c.train.batch_size = 512
    c.train.lr = 0.4 if scale == "full" else 0.2
    c.train.warmup_epochs = 1
    c.train.log_every_steps = 50
    if scale == "full":
      n = int(epochs or FULL_EPOCHS)
      c.train.epochs = n
      c.train.lr_boundaries = (math.floor(0.75 * n), math.floor(0.9 * n))
    else:
      c.train.epochs = 8
      c.train.lr_boundaries = (6, 7)
  elif scale == "cpu":
    c.model.width = 0.125
    c.data.num_train = 5000
    c.data.num_test = 1000
    c.train.batch_size = 128
    c.train.epochs = 6
    c.train.lr_boundaries = (5,)
    c.train.log_every_steps = 13
    c.eval.every_epochs = 2
  else:
    default_config.shrink(c, attack_steps=2)
    c.model.name = "small_cnn"      # a cell in half PreActResNet-18's time on a CPU
    c.model.width = 0.25
    c.attack.step_size = 4 / 255
  return c
