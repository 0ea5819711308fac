"""sovr_jax.rundir's provenance (the rest of the run directory is tested by its faults in
test_faults.py and by the trainer's tests in test_experiment.py)."""

import json
import os
import subprocess
import sys

from sovr_jax import rundir
from tests import references

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_cpu_from_cpuinfo_reads_the_model_and_the_vector_extensions():
  assert rundir.cpu_from_cpuinfo(X86) == {
      "model": "Intel(R) Xeon(R) Platinum 8480+",
      "isa": ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]}
  assert rundir.cpu_from_cpuinfo(ARM) == {"model": "0xd40", "isa": ["asimd", "sve"]}
  assert rundir.cpu_from_cpuinfo("") == {"model": "", "isa": []}


def test_provenance_names_the_cpu_of_this_machine():
  p = rundir.provenance()
  assert p["cpu"]["model"] and p["cpu"]["cores"] >= 1
  assert set(p["cpu"]["isa"]) <= set(rundir._ISA_FLAGS)  # pylint: disable=protected-access


VERSIONS = r"""
import json, sys
from sovr_jax import rundir
out = {"named": rundir.versions("torch", "not_a_module_xyz"), "imported": "torch" in sys.modules}
import torch
out["torch"] = torch.__version__
print("RESULT" + json.dumps(out))
"""


@references.needs("torch")
def test_versions_name_torch_without_importing_it():
  """Every result file names torch's version; importing torch for it took 2 s (and loads a
  CUDA torch beside jax on a GPU) in runs that never use it."""
  proc = subprocess.run([sys.executable, "-c", VERSIONS], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert not out["imported"]
  assert out["named"]["torch"] == out["torch"]
  assert "not_a_module_xyz" not in out["named"]
  assert out["named"]["sovr_jax"] and out["named"]["orbax.checkpoint"]
