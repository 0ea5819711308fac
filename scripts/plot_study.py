"""Figures and tables of the reproduction study (``sovr_jax.study_report``):

    python -m scripts.plot_study --study results/study_full.json --out results/study_full
"""

from sovr_jax.study_report import main

if __name__ == "__main__":
  main()
