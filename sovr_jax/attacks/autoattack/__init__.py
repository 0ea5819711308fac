"""AutoAttack in JAX: APGD-CE, APGD-T, FAB-T, Square (L-inf and L2) and the standard ensemble.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (github.com/fra31/auto-attack). Every attack is a pure,
jittable function ``attack(model_fn, x, y, rng, *, eps, ...) -> x_adv`` vectorised over the
batch; ``run_standard`` runs the ensemble over a data set in batches.
"""

from sovr_jax.attacks.autoattack.apgd import (APGDRun, apgd, apgd_run, apgd_targeted,
                                              check_oscillation, dlr_loss, dlr_loss_targeted,
                                              init_point, step_size_checkpoints)
from sovr_jax.attacks.autoattack.ensemble import (ATTACKS, STANDARD_ATTACKS, make_attack,
                                                  run_standard)
from sovr_jax.attacks.autoattack.fab import (FABRun, fab, fab_run, projection_l2,
                                             projection_linf, projection_linf_sorted)
from sovr_jax.attacks.autoattack.square import p_selection, square, square_eta, square_sizes

__all__ = ["APGDRun", "ATTACKS", "FABRun", "STANDARD_ATTACKS", "apgd", "apgd_run",
           "apgd_targeted", "check_oscillation", "dlr_loss", "dlr_loss_targeted", "fab",
           "fab_run", "init_point", "make_attack", "p_selection", "projection_l2", "projection_linf",
           "projection_linf_sorted", "run_standard", "square", "square_eta", "square_sizes",
           "step_size_checkpoints"]
