"""The reproduction study in one command (``sovr_jax.study``): train every cell, attack it,
collect one JSON.

    python -m scripts.study --scale full --runs pgd_at,sovr --seeds 0,1,2 --workdir runs/study \
        --out /tmp/study.json --into results/study_full.json
"""

from sovr_jax.study import main

if __name__ == "__main__":
  main()
