"""Attacks: PGD (L-inf, L2) as composable pieces."""

from sovr_jax.attacks.pgd import (INITS, NORMS, OBJECTIVES, PGDResult,
                                  ascent_step, check_attack_args, init_delta,
                                  objective_fn, pgd, project)

__all__ = ["INITS", "NORMS", "OBJECTIVES", "PGDResult", "ascent_step",
           "check_attack_args", "init_delta", "objective_fn", "pgd", "project"]
