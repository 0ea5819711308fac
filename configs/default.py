"""Default: SOVR, PreActResNet-18, CIFAR-10, the common PGD-AT recipe.

    python -m sovr_jax.main --config configs/default.py --workdir runs/sovr
    python -m sovr_jax.main --config configs/default.py:trades --workdir runs/trades
    python -m sovr_jax.main --config configs/default.py --config.method=mart \
        --config.train.epochs=5 --workdir runs/mart5

Recipe (../shared/docs/method.md): SGD, momentum 0.9, lr 0.1, weight decay 5e-4, batch 128,
110 epochs with lr x0.1 at epochs 100 and 105, pad-4 crop + flip, PGD-10 at eps 8/255 (step
2/255) with BatchNorm running statistics. The fields and their defaults live in the package
(``sovr_jax/default_config.py``), so that the library never imports this folder.
"""

from sovr_jax import default_config


def get_config(method: str = "sovr"):
  return default_config.get_config(method)
