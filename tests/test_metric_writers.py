"""metric_writers: the JSONL and TensorBoard records, written without importing torch."""

import glob
import json
import os
import subprocess
import sys

from tests import references

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCH_PRESENT = r"""
import json, sys
from sovr_jax import metric_writers
w = metric_writers.MetricWriter(sys.argv[1])
w.write({"step": 3, "epoch": 1, "loss": 0.5, "note": "not a scalar"})
out = {"torch_after_writer": "torch" in sys.modules, "writer": w._tb is not None}
import torch  # importable again once tensorboardX is imported
out["torch_importable"] = torch.zeros(1).shape == (1,)
print("RESULT" + json.dumps(out))
"""


@references.needs("torch", "tensorboardX")
def test_tensorboard_is_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch when it is imported (2 s; a CUDA torch beside jax on a GPU);
  a training run never did need it. Run in a fresh process: torch is not imported yet."""
  proc = subprocess.run([sys.executable, "-c", TORCH_PRESENT, str(tmp_path)], cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert out == {"torch_after_writer": False, "writer": True, "torch_importable": True}
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.readline()) == {"step": 3, "epoch": 1, "loss": 0.5,
                                        "note": "not a scalar"}
  events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert len(events) == 1 and os.path.getsize(events[0]) > 0
