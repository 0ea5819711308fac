"""Plots the margin-growth check (OVR vs weighted CE on free logits).

    python -m scripts.plot_theory --out results/theory

writes <out>.json (the trajectories and fitted rates) and <out>.png.
"""

import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sovr_jax import theory  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="results/theory")
  parser.add_argument("--num_classes", type=int, default=10)
  args = parser.parse_args()
  curves = {}
  for name, weight in (("ovr", 1.0), ("ce", 1.0), ("ce", 0.25)):
    log_t, m = theory.margin_trajectory(name, num_classes=args.num_classes, weight=weight)
    label = "OVR" if name == "ovr" else f"CE (w={weight:g})"
    curves[label] = {"log_t": log_t[::40].tolist(), "margin": m[::40].tolist(),
                     "rate": theory.log_time_rate(log_t, m)}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump({"num_classes": args.num_classes, "curves": curves}, f, indent=1)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, c in curves.items():
    ax.plot(np.exp(c["log_t"]), c["margin"], label=f"{label}: {c['rate']:.2f} per log t")
  ax.set_xscale("log")
  ax.set_xlabel("t (gradient-flow time)")
  ax.set_ylabel("logit margin")
  ax.set_title(f"Free logits, K={args.num_classes}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)
  print(json.dumps({k: round(v["rate"], 3) for k, v in curves.items()}))


if __name__ == "__main__":
  main()
