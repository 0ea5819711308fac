"""sovr_jax.profiling: kernel classes of real kernel names, self times of nested events, the
device lines of GPU and CPU traces, and a real trace taken on the CPU."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sovr_jax import profiling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel and op names as XLA, cuDNN and cuBLAS spell them (GPU traces) and XLA:CPU's thunks.
NAMES = [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
     "convolution"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "convolution"),
    ("cudnn_infer_ampere_scudnn_winograd_128x128_ldg1_ldg4_relu_tile148t_nt_v1", "convolution"),
    ("conv_general_dilated.264", "convolution"),
    ("convolution.14", "convolution"),
    ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNN", "matmul"),
    ("triton_gemm_dot_3", "matmul"),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8", "matmul"),
    ("loop_convert_fusion_3", "elementwise fusion"),   # "convert" is not a convolution
    ("loop_add_maximum_fusion", "elementwise fusion"),
    ("input_reduce_fusion_12", "reduction"),
    ("transpose_copy_fusion.46", "copy/transpose"),
    ("MemcpyD2H", "copy/transpose"),
    ("loop_dynamic_update_slice_fusion", "copy/transpose"),
    ("while.201", "other"),
]


@pytest.mark.parametrize("name,cls", NAMES)
def test_kernel_class(name, cls):
  assert profiling.kernel_class(name) == cls


def _meta(pid, tid, process, thread):
  return [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}},
          {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}]


def _x(pid, tid, name, ts, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_gpu_trace_reads_the_stream_kernels_only():
  """Kernels on the CUDA stream count; the XLA Ops line above them (the same time again) and
  the host's events do not."""
  events = (_meta(1, 10, "/device:GPU:0", "Stream #13(Compute)")
            + _meta(1, 11, "/device:GPU:0", "XLA Ops")
            + _meta(2, 20, "/host:CPU", "python"))
  for step in range(2):
    t = step * 1000
    events += [_x(1, 10, "sm90_xmma_fprop_implicit_gemm_bf16", t, 300),
               _x(1, 10, "sm90_xmma_dgrad_implicit_gemm_bf16", t + 300, 300),
               _x(1, 10, "loop_add_maximum_fusion", t + 600, 100),
               _x(1, 10, "input_reduce_fusion", t + 700, 100),
               _x(1, 11, "custom-call.3", t, 600),
               _x(2, 20, "PjitFunction(train_step)", t, 900)]
  found, source = profiling.device_events({"traceEvents": events})
  assert source == "gpu streams" and len(found) == 8
  s = profiling.summarize(found, steps=2, wall_s=2e-3, source=source, top=2)
  assert s["device_ms_per_step"] == pytest.approx(0.8)
  assert s["busy_fraction"] == pytest.approx(0.8) and s["wall_ms_per_step"] == pytest.approx(1.0)
  assert s["classes"]["convolution"] == pytest.approx(
      {"ms_per_step": 0.6, "share": 0.75, "launches_per_step": 2})
  assert s["classes"]["reduction"]["share"] == pytest.approx(0.125)
  assert sum(c["share"] for c in s["classes"].values()) == pytest.approx(1.0)
  assert [k["class"] for k in s["top"]] == ["convolution", "convolution"]
  table = profiling.format_table(s)
  assert "| convolution | 0.600 | 75.0% | 2 |" in table and "busy 80%" in table


def test_a_device_with_other_line_names_is_still_read_from_the_device():
  events = (_meta(1, 10, "/device:GPU:0", "Kernels") + _meta(2, 20, "/host:CPU", "tf_XLAEigen/1")
            + [_x(1, 10, "sm90_xmma_fprop_implicit_gemm", 0, 40),
               _x(2, 20, "conv_general_dilated.1", 0, 500)])
  found, source = profiling.device_events({"traceEvents": events})
  assert source == "device lines" and [e["name"] for e in found] == [
      "sm90_xmma_fprop_implicit_gemm"]


def test_cpu_trace_counts_nested_thunks_once():
  """A while thunk holds its body's thunks: each counts its own time; the executor's
  bookkeeping events are not device work."""
  events = _meta(1, 5, "/host:CPU", "tf_XLAEigen/123") + [
      _x(1, 5, "ThunkExecutor::Execute", 0, 100),
      _x(1, 5, "while.1", 0, 100),
      _x(1, 5, "conv_general_dilated.2", 10, 30),
      _x(1, 5, "add_maximum_fusion.3", 40, 20),
      _x(1, 5, "conv_general_dilated.4", 200, 50)]
  found, source = profiling.device_events({"traceEvents": events})
  assert source == "cpu thunks"
  self_us = {e["name"]: e["self_us"] for e in found}
  assert self_us == {"while.1": 50, "conv_general_dilated.2": 30, "add_maximum_fusion.3": 20,
                     "conv_general_dilated.4": 50}
  s = profiling.summarize(found, steps=1)
  assert s["classes"]["convolution"]["ms_per_step"] == pytest.approx(0.08)
  assert s["top"][0] == {"name": "conv_general_dilated", "class": "convolution",
                         "ms_per_step": pytest.approx(0.08), "share": pytest.approx(80 / 150),
                         "launches_per_step": 2}


def test_a_real_trace_on_the_cpu_and_the_command_line(tmp_path):
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 8))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 32, 32, 8))
  f = jax.jit(lambda x: jnp.tanh(jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).sum())
  s = profiling.profile(lambda: f(x), logdir=str(tmp_path / "trace"), steps=2)
  assert s["source"] == "cpu thunks" and s["steps"] == 2
  assert s["classes"]["convolution"]["ms_per_step"] > 0 and s["busy_fraction"] > 0
  assert s["trace"].endswith("perfetto_trace.json.gz")
  cmd = [sys.executable, "-m", "sovr_jax.profiling"]
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run(cmd + [str(tmp_path / "trace"), "--steps", "2"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0 and "| convolution |" in out.stdout, out.stderr[-2000:]
  out = subprocess.run(cmd + [str(tmp_path / "none")], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 2 and "No perfetto_trace.json.gz" in out.stderr
  assert "Traceback" not in out.stderr
  with pytest.raises(ValueError, match="steps"):
    profiling.summarize([], steps=0)


GPU_HLO = """HloModule jit_step

%fused_relu (p: bf16[8,32,32,64]) -> bf16[8,32,32,64] {
  %p = bf16[8,32,32,64]{3,2,1,0} parameter(0)
  %convolution.9 = bf16[8,32,32,64]{3,2,1,0} convolution(%p, %p), window={size=3x3}
  ROOT %max = bf16[8,32,32,64]{3,2,1,0} maximum(%convolution.9, %p)
}

%body (s: (s32[], bf16[8,32,32,64])) -> (s32[], bf16[8,32,32,64]) {
  %s = (s32[], bf16[8,32,32,64]) parameter(0)
  %x = bf16[8,32,32,64]{3,2,1,0} get-tuple-element(%s), index=1
  %cudnn-conv-bias-activation.1 = (bf16[8,32,32,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x), custom_call_target="__cudnn$convBiasActivationForward"
  %cudnn-conv.2 = (bf16[8,32,32,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x), custom_call_target="__cudnn$convBackwardInput"
  %loop_maximum_fusion = bf16[8,32,32,64]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_relu
  %transpose.3 = bf16[8,64,32,32]{3,2,1,0} transpose(%x), dimensions={0,3,1,2}
  ROOT %t = (s32[], bf16[8,32,32,64]) tuple(%x, %x)
}

ENTRY %main (a: bf16[8,32,32,64]) -> bf16[8,32,32,64] {
  %a = bf16[8,32,32,64]{3,2,1,0} parameter(0)
  %cudnn = bf16[8,32,32,64]{3,2,1,0} fusion(%a), kind=kCustom, calls=%fused_relu, backend_config={"fusion_backend_config":{"kind":"__cudnn$fusion"}}
  %w = (s32[], bf16[8,32,32,64]) while(%a), condition=%cond, body=%body
  ROOT %r = bf16[8,32,32,64]{3,2,1,0} copy(%a)
}
"""


def test_hlo_census_counts_what_the_program_launches():
  """Instructions inside fused computations are not launches of their own; a loop body's
  count once; custom calls by target, fusions by kind (kCustom by its backend kind)."""
  census = profiling.hlo_census(GPU_HLO)
  assert census["ops"] == {"custom-call": 2, "fusion": 2, "transpose": 1, "while": 1, "copy": 1}
  assert census["custom_calls"] == {"__cudnn$convBiasActivationForward": 1,
                                    "__cudnn$convBackwardInput": 1}
  assert census["fusions"] == {"kLoop": 1, "__cudnn$fusion": 1}
  w = jnp.ones((3, 3, 8, 8))
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, x: jax.nn.relu(
      jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))), x).sum())
  real = profiling.hlo_census(f.lower(jnp.ones((4, 16, 16, 8))).compile().as_text())
  assert real["ops"]["while"] == 1 and real["ops"].get("convolution", 0) + sum(
      real["custom_calls"].values()) + real["fusions"].get("kCustom", 0) >= 1
