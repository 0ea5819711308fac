"""The benchmark (sovr_jax.bench): its FLOP count against formulas, and one tiny run of
every kind of row on the CPU (JAX step, PyTorch twin, host batches, the epoch end to end)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sovr_jax import bench, models
from tests import references


class _ConvDense(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(5, (3, 3), padding="SAME")(x)          # 8*8*5 outputs x 3*3*2 MACs each
    x = jax.lax.scan(lambda c, _: (nn.relu(c), None), x, None, length=2)[0]  # no MACs
    return nn.Dense(4)(x.reshape(x.shape[0], -1))       # 4 outputs x 320 MACs each


def test_forward_flops_counts_convs_and_matmuls():
  model = _ConvDense()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2)))
  assert bench.forward_flops(model, variables, (8, 8, 2)) == 2 * (8 * 8 * 5 * 9 * 2 + 4 * 320)


def test_jaxpr_flops_recurses_into_nested_jaxprs():
  w = jnp.ones((6, 7))
  inner = jax.make_jaxpr(lambda x: x @ w)(jnp.ones((3, 6)))
  looped = jax.make_jaxpr(lambda x: jax.lax.fori_loop(0, 4, lambda i, c: c @ jnp.eye(6), x))(
      jnp.ones((3, 6)))
  assert bench._jaxpr_flops(inner.jaxpr) == 2 * 3 * 7 * 6
  assert bench._jaxpr_flops(looped.jaxpr) == 2 * 3 * 6 * 6  # the body once, not x4


def test_cpu_smoke_rows(tmp_path):
  """Every kind of row at CPU sizes, and their figures' arithmetic. The small CNN: the plumbing
  is the same for every model, and PreActResNet-18's three step compilations made this test
  104 s in the suite, 31 s alone with the small CNN (2026-12-03)."""
  with_torch = references.have("torch")  # always in CI (tests/references.py)
  rows = bench.main(["--cpu_smoke", "--archs=small_cnn", "--methods=pgd_at", "--dispatch=1",
                     f"--torch={'float32' if with_torch else ''}",
                     "--host_batches", "--epoch", "--iters=1", "--repeats=1",
                     f"--profile={tmp_path}"])
  by_kind = {(r["framework"], r.get("method"), r.get("host_batches"), "epoch_s" in r): r
             for r in rows}
  pgd = by_kind[("jax", "pgd_at", False, False)]
  if with_torch:  # the PyTorch twin's row and the ratio to it
    torch_row = by_kind[("torch", "pgd_at", None, False)]
    assert torch_row["images_per_s"] > 0 and torch_row["precision"] == "float32"
    assert pgd["ratio_vs_torch_eager_f32"] == pytest.approx(
        pgd["images_per_s"] / torch_row["images_per_s"])
  # PGD-2: (2K + 3) = 7 forward-equivalents per image.
  model = models.get_model("small_cnn", num_classes=10, width=0.0625)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
  fwd = bench.forward_flops(model, variables, (32, 32, 3))
  assert pgd["gflop_per_image"] == pytest.approx(7 * fwd / 1e9)
  assert pgd["tflops"] == pytest.approx(pgd["images_per_s"] * pgd["gflop_per_image"] / 1e3)
  assert by_kind[("jax", "pgd_at", True, False)]["images_per_s"] > 0
  # --profile: where the step's time goes, per kernel class (convolutions, on any backend).
  prof = pgd["profile"]
  assert prof["steps"] == 3 and prof["classes"]["convolution"]["ms_per_step"] > 0
  assert sum(c["share"] for c in prof["classes"].values()) == pytest.approx(1.0)
  assert pgd["hlo"]["ops"]["while"] >= 1  # the attack's loop, in the compiled step
  epoch = by_kind[("jax", "pgd_at", None, True)]
  assert epoch["epoch_images"] == 256 and epoch["epoch_s"] > 0
  assert epoch["overhead"] == pytest.approx(epoch["epoch_s"] / epoch["steps_only_s"] - 1)
  # Every row's wall time (compilation, profile included): the epoch row times two epochs.
  assert all(r["case_s"] > 0 for r in rows) and epoch["case_s"] >= epoch["epoch_s"]


def test_xla_flag_sets_run_side_by_side(tmp_path):
  """--xla_flags: one process per set (XLA reads its flags at start), every row labelled with
  its set, all rows in one --out. (The small CNN: two compilations of PreActResNet-18's step
  took 20 s more, for the same plumbing.)"""
  out = tmp_path / "flags.json"
  rows = bench.main(["--cpu_smoke", "--archs=small_cnn", "--methods=pgd_at", "--torch=",
                     "--dispatch=1",
                     "--iters=1", "--repeats=1", "--xla_flags", ";--xla_cpu_use_onednn=false",
                     "--out", str(out)])
  assert [(r["xla_flags"], r["steps_per_dispatch"]) for r in rows] == [
      ("", 1), ("--xla_cpu_use_onednn=false", 1)]
  assert all(r["images_per_s"] > 0 and r["arch"] == "small_cnn" for r in rows)
  # Untraced rows count their compiled HLO too (a layout's transposes show there).
  assert all(r["hlo"]["ops"]["while"] >= 1 for r in rows)
  import json  # pylint: disable=import-outside-toplevel
  saved = json.loads(out.read_text())
  assert saved["rows"] == rows and saved["header"]["platform"] == "cpu"
  # The header is a result file's provenance: every library's version, the CPU, the command.
  header = saved["header"]
  assert header["versions"]["flax"] and header["versions"]["jax"] == jax.__version__
  assert header["device_kind"] and header["devices"]
  assert header["cpu"]["cores"] and header["created"]
  assert header["command"].startswith("python -m sovr_jax.bench --cpu_smoke")  # the subprocess
