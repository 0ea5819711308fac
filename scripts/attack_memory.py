"""The device memory of one AutoAttack call, from XLA's analysis of the compiled call (nothing
runs, so any machine will do; a GPU's figures may differ somewhat from the CPU's):

    python -m scripts.attack_memory --attack apgd-t --runs_at_once 1,9

prints the temporaries per point of the call for each ``runs_at_once``.
"""

import argparse

import jax
import jax.numpy as jnp

from sovr_jax import models
from sovr_jax.attacks.autoattack import ensemble


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="preact_resnet18")
  p.add_argument("--attack", default="apgd-t", choices=ensemble.ATTACKS)
  p.add_argument("--points", type=int, default=16, help="points per call")
  p.add_argument("--runs_at_once", default="1,9")
  a = p.parse_args()
  model = models.get_model(a.model, num_classes=10)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  shapes = [jax.ShapeDtypeStruct((a.points, 32, 32, 3), jnp.float32),
            jax.ShapeDtypeStruct((a.points,), jnp.int32),
            jax.ShapeDtypeStruct((a.points,), jnp.bool_),
            jax.ShapeDtypeStruct((2,), jnp.uint32), v]
  for c in [int(r) for r in a.runs_at_once.split(",")]:
    def call(x, y, active, key, variables, c=c):
      attack = ensemble.make_attack(a.attack, lambda z: model.apply(variables, z),
                                    eps=8 / 255, runs_at_once=c)
      return attack(x, y, active, key)
    mem = jax.jit(call).lower(*shapes).compile().memory_analysis()
    print(f"{a.model} {a.attack} runs_at_once={c}: "
          f"{mem.temp_size_in_bytes / a.points / 1e6:.1f} MB of temporaries per point "
          f"({jax.devices()[0].platform}, float32)")


if __name__ == "__main__":
  main()
