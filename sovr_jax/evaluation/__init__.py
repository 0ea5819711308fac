"""Evaluation of a trained model with AutoAttack (Croce & Hein, ICML 2020).

Two engines behind one interface, writing one result schema (``schema``):

* ``reference``: pyautoattack (fra31/auto-attack) on the model's PyTorch twin, attack by
  attack, resumable after a kill, every returned example verified;
* ``jax_engine``: ``sovr_jax.attacks.autoattack`` on the JAX model (TPU/GPU, no torch);
* ``compare``: both on the same points, side by side.

``targets`` builds what is attacked (a training run, an export, test models); ``settings``
holds the standard version's settings and the parsing of eps and attack lists. The command
line is ``python -m sovr_jax.autoattack_eval --engine reference|jax|both``. torch is imported
only by the reference engine.
"""
