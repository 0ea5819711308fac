"""A seconds-long config for tests and smoke runs: 256 MNIST-5k digits, a tiny CNN, PGD-3."""

from configs import default


def shrink(c, attack_steps: int = 3):
  """Seconds-long sizes on any config: 256 train / 64 val / 64 test examples, batch 32,
  2 epochs, PGD-``attack_steps`` in training and evaluation."""
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


def get_config(method: str = "sovr"):
  c = shrink(default.get_config(method))
  c.data.name = "mnist5k"
  c.data.source = "embedded"
  c.data.crop_pad = 1
  c.data.flip = False
  c.model.name = "small_cnn"
  c.model.width = 0.25
  c.attack.eps = 0.1
  c.attack.step_size = 0.04
  return c
