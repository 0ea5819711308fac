"""The reproduction study: PreActResNet-18 on CIFAR-10 (JPEG copy), one short schedule for all.

    python -m sovr_jax.main --config configs/study.py:sovr --workdir runs/study/sovr
    python -m sovr_jax.main --config configs/study.py:mail_at,tiny --workdir /tmp/mail_tiny
    python -m scripts.study --scale gpu ...        # every run of the study, then AutoAttack

The argument after ':' is ``METHOD[,SCALE]``:
  gpu   (default) full-width PreActResNet-18, bfloat16 compute, batch 512, 8 epochs: lr 0.2
        (the recipe's 0.1 at batch 128 times sqrt(512 / 128)), 1 warm-up epoch,
        x0.1 at epochs 6 and 7 (75 % and 90 %, the MART/MAIL boundaries scaled to 8 epochs),
        PGD-10 at eps 8/255 with step 2/255. MAIL's reweighting starts at epoch 6 (75 %) and
        GAIRAT's at epoch 4 (50 %), their recipes' fractions. About 40 s of H200 time per run.
  cpu   a 1/8-width network (175k parameters) on 5,000 training images for 6 epochs, PGD-10,
        float32, batch 128, lr 0.1 (x0.1 at epoch 5), test on 1,000: a CIFAR model
        trained adversarially in minutes on a 2-core CPU, e.g. to check the JAX AutoAttack
        against pyautoattack (docs/autoattack.md).
  tiny  a 1/16-width network on 256 images for 2 epochs, PGD-2: CPU smoke tests of the study.

The data is ../shared/data/cifar10-jpeg.tar.gz (a folder or tarball of train|test/<class>/*.jpg);
pass --config.data.path=... when it lives elsewhere.
"""

from configs import default, tiny

SCALES = ("gpu", "cpu", "tiny")
CIFAR10_JPEG = "../shared/data/cifar10-jpeg.tar.gz"


def get_config(arg: str = "sovr"):
  method, _, scale = (arg or "sovr").partition(",")
  scale = scale or "gpu"
  if scale not in SCALES:
    raise ValueError(f"Unknown study scale {scale!r} in {arg!r}; valid: {SCALES} "
                     f"(e.g. configs/study.py:{method or 'sovr'},gpu).")
  c = default.get_config(method)
  c.data.name = "cifar10"           # checks the folder's class list, CIFAR-10's mean/std.
  c.data.source = "image_folder"
  c.data.path = CIFAR10_JPEG
  c.data.val_size = 1000            # 49,000 train / 1,000 val (chooses "best") / 10,000 test.
  c.eval.margin_examples = 2000
  if scale == "gpu":
    c.precision = "bfloat16"
    c.train.batch_size = 512
    c.train.epochs = 8
    c.train.lr = 0.2
    c.train.warmup_epochs = 1
    c.train.lr_boundaries = (6, 7)
    c.train.log_every_steps = 50
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
    tiny.shrink(c, attack_steps=2)
    c.model.width = 0.0625
    c.attack.step_size = 4 / 255
  return c
