"""sovr-jax: adversarial training with the SOVR loss (Kanai et al., ICML 2023) in JAX/Flax."""

__version__ = "0.2.0"
