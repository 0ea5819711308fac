"""Where the time of a jitted step goes: a ``jax.profiler`` trace, read per kernel class.

    python -m sovr_jax.bench --profile DIR ...     # traces every JAX case after timing it
    python -m sovr_jax.profiling DIR [--steps N]   # the table of a trace already taken

``hlo_census`` counts what the compiled program launches (convolutions, fusions by kind, cuDNN
and cuBLAS custom calls), from its optimized HLO; the benchmark adds it to each profiled row.

``jax.profiler.trace(DIR, create_perfetto_trace=True)`` writes
``DIR/plugins/profile/<run>/perfetto_trace.json.gz``, Chrome trace events. The device work is
read from it as follows:
- on a GPU, the kernels on the CUDA streams of ``/device:GPU:N`` (one event per kernel launch);
- on a TPU, the ops on the "XLA Ops" lines of ``/device:TPU:N``;
- on a CPU, the XLA thunks on the host's ``tf_XLA*`` threads (these run in parallel, so their
  sum can exceed the wall time; a CPU profile is a smoke test, not a reading).

Each event counts its own time only (its duration less that of the events nested in it, as a
``while`` thunk holds its body's), so nothing is counted twice. A kernel's class comes from its
name (``kernel_class``): cuDNN's convolution kernels (``..._fprop_implicit_gemm...``,
``dgrad``, ``wgrad``) and XLA's ``convolution`` / ``conv_general_dilated``; matrix products
(``gemm``, cuBLAS ``nvjet``/``cutlass``, ``dot``); reductions; copies and transposes; the other
XLA fusions (element-wise work: BatchNorm, ReLU, the attack's sign step and projection); other.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Any, Callable, Sequence

import jax

from sovr_jax import cli

#: Kernel classes, in the order of the rules of ``kernel_class`` (the first match wins).
CLASSES = ("convolution", "matmul", "reduction", "copy/transpose", "elementwise fusion",
           "other")
_RULES = (
    ("convolution", re.compile(r"conv(?!ert)|cudnn|fprop|dgrad|wgrad|winograd")),
    ("matmul", re.compile(r"gemm|cublas|nvjet|cutlass|matmul|\bdot|dot_")),
    ("reduction", re.compile(r"reduc")),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|concatenate|dynamic.update")),
    ("elementwise fusion", re.compile(r"fusion|triton|elementwise|loop_")),
)
#: Host-side bookkeeping on the CPU backend's threads (not device work).
_CPU_BOOKKEEPING = re.compile(r"::|^end: |^\$")


def kernel_class(name: str) -> str:
  """The class (one of ``CLASSES``) of a kernel or XLA op from its name."""
  low = name.lower()
  for cls, rule in _RULES:
    if rule.search(low):
      return cls
  return "other"


def find_trace(logdir: str) -> str:
  """The newest ``perfetto_trace.json.gz`` under ``logdir``."""
  paths = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"No perfetto_trace.json.gz under {logdir}: take a trace with "
                            f"jax.profiler.trace(logdir, create_perfetto_trace=True) or "
                            f"python -m sovr_jax.bench --profile {logdir}.")
  return max(paths, key=os.path.getmtime)


def device_events(trace: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
  """The device-work events of a Chrome trace as [{"name", "self_us", "line"}] and where they
  were read ("gpu streams", "tpu xla ops", "device lines" or "cpu thunks")."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  device = {pid for pid, name in procs.items()
            if name.startswith("/device:") and not name.startswith("/device:CPU")}
  lines = {k: v for k, v in threads.items() if k[0] in device}
  streams = {k for k, v in lines.items() if "stream" in v.lower()}
  ops = {k for k, v in lines.items() if v == "XLA Ops"}
  if streams:
    keep, source = streams, "gpu streams"
  elif ops:
    keep, source = ops, "tpu xla ops"
  elif lines:  # a device whose lines are named otherwise: all of them (self times)
    keep, source = set(lines), "device lines"
  else:
    keep = {k for k, v in threads.items() if k[0] not in device and v.startswith("tf_XLA")}
    source = "cpu thunks"
  per_line = collections.defaultdict(list)
  for e in events:
    key = (e.get("pid"), e.get("tid"))
    if e.get("ph") == "X" and key in keep and "dur" in e:
      if source == "cpu thunks" and _CPU_BOOKKEEPING.search(e["name"]):
        continue
      per_line[key].append(e)
  out = []
  for key, evs in per_line.items():
    out.extend(_self_times(evs, threads.get(key, "")))
  return out, source


def _self_times(events: list[dict[str, Any]], line: str) -> list[dict[str, Any]]:
  """Each event's duration less that of the events nested in it (one thread's events)."""
  events = sorted(events, key=lambda e: (float(e["ts"]), -float(e["dur"])))
  out, stack = [], []   # stack of (end time, index into out)
  for e in events:
    ts, dur = float(e["ts"]), float(e["dur"])
    while stack and stack[-1][0] <= ts:
      stack.pop()
    if stack:
      out[stack[-1][1]]["self_us"] -= dur
    out.append({"name": e["name"], "self_us": dur, "line": line})
    stack.append((ts + dur, len(out) - 1))
  return out


def summarize(events: Sequence[dict[str, Any]], *, steps: int, wall_s: float | None = None,
              source: str = "", top: int = 12) -> dict[str, Any]:
  """Device time per step by kernel class, and the ``top`` kernels by time.

  Returns {"steps", "source", "device_ms_per_step", "wall_ms_per_step", "busy_fraction",
  "classes": {class: {"ms_per_step", "share", "launches_per_step"}}, "top": [{"name",
  "class", "ms_per_step", "share", "launches_per_step"}]} (busy_fraction = device time /
  wall time: below 1 the device waits, on the host or on launches).
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  total = sum(e["self_us"] for e in events)
  by_class: dict[str, list[float]] = {c: [0.0, 0] for c in CLASSES}
  by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    name = re.sub(r"\.\d+$", "", e["name"])  # conv_general_dilated.264 -> one entry
    by_class[kernel_class(e["name"])][0] += e["self_us"]
    by_class[kernel_class(e["name"])][1] += 1
    by_name[name][0] += e["self_us"]
    by_name[name][1] += 1
  share = (lambda us: us / total) if total > 0 else (lambda us: 0.0)
  ms = lambda us: us / 1e3 / steps  # noqa: E731
  out = {
      "steps": steps, "source": source, "device_ms_per_step": ms(total),
      "classes": {c: {"ms_per_step": ms(us), "share": share(us), "launches_per_step": n / steps}
                  for c, (us, n) in by_class.items() if n},
      "top": [{"name": name, "class": kernel_class(name), "ms_per_step": ms(us),
               "share": share(us), "launches_per_step": n / steps}
              for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
  }
  if wall_s is not None:
    out["wall_ms_per_step"] = wall_s * 1e3 / steps
    out["busy_fraction"] = total / 1e6 / wall_s if wall_s > 0 else 0.0
  return out


def read(logdir: str, *, steps: int, wall_s: float | None = None) -> dict[str, Any]:
  """``summarize`` of the newest trace under ``logdir``."""
  path = find_trace(logdir)
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events, source = device_events(trace)
  return {**summarize(events, steps=steps, wall_s=wall_s, source=source), "trace": path}


def profile(fn: Callable[[], Any], *, logdir: str, steps: int = 3) -> dict[str, Any]:
  """Runs ``fn`` (one step, already compiled and warm) ``steps`` times inside a trace and
  reads it (``read``). Each call's outputs are waited for before the next."""
  os.makedirs(logdir, exist_ok=True)
  jax.block_until_ready(fn())
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    t = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(fn())
    wall = time.perf_counter() - t
  return read(logdir, steps=steps, wall_s=wall)


#: HLO instructions that are bookkeeping, not work (left out of ``hlo_census``'s ops).
_HLO_BOOKKEEPING = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast"})
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) ")
_HLO_OP = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = .*?\s([a-z][\w-]*)\(")


def hlo_census(hlo_text: str) -> dict[str, dict[str, int]]:
  """What a compiled program launches, counted on its optimized HLO text
  (``jitted.lower(...).compile().as_text()``), each instruction once (a loop body's too):

  - "ops": the instructions outside fused computations, by opcode (``convolution``,
    ``fusion``, ``custom-call``, ``copy``, ``transpose``, ``while`` ...; bookkeeping left out);
  - "fusions": the fusions by kind (kLoop, kInput, kOutput, kCustom; a kCustom fusion by its
    backend kind, e.g. ``__cudnn$fusion``);
  - "custom_calls": the custom calls by target (on a GPU ``__cudnn$convForward``,
    ``__cudnn$convBackwardInput``, ``__cudnn$convBiasActivationForward`` for a convolution
    with its bias and activation fused, ``__cublas$gemm`` ...).
  """
  fused = set(re.findall(r"\bfusion\(.*?calls=%([\w.-]+)", hlo_text))
  ops: collections.Counter = collections.Counter()
  fusions: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  inside = None
  for line in hlo_text.splitlines():
    head = _HLO_COMPUTATION.match(line)
    if head and line.rstrip().endswith("{"):
      inside = head.group(1)
      continue
    m = _HLO_OP.match(line)
    if m is None or inside in fused:
      continue
    op = m.group(1)
    if op in _HLO_BOOKKEEPING:
      continue
    ops[op] += 1
    if op == "fusion":
      kind = re.search(r"kind=(\w+)", line)
      backend = re.search(r'"kind":"([^"]+)"', line)
      fusions[backend.group(1) if backend and kind and kind.group(1) == "kCustom"
              else kind.group(1) if kind else "?"] += 1
    elif op == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', line)
      calls[target.group(1) if target else "?"] += 1
  return {"ops": dict(ops), "fusions": dict(fusions), "custom_calls": dict(calls)}


def format_table(summary: dict[str, Any]) -> str:
  """The classes and the top kernels of a ``summarize`` result as Markdown."""
  busy = summary.get("busy_fraction")
  lines = [f"device time {summary['device_ms_per_step']:.3f} ms per step"
           + (f", wall {summary['wall_ms_per_step']:.3f} ms (busy {busy:.0%})"
              if busy is not None else "") + f" [{summary['source']}]", "",
           "| kernel class | ms per step | share | launches per step |",
           "| --- | ---: | ---: | ---: |"]
  for c, v in sorted(summary["classes"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
    lines.append(f"| {c} | {v['ms_per_step']:.3f} | {v['share']:.1%} | "
                 f"{v['launches_per_step']:.0f} |")
  lines += ["", "| kernel | class | ms per step | share | launches per step |",
            "| --- | --- | ---: | ---: | ---: |"]
  for k in summary["top"]:
    name = k["name"] if len(k["name"]) <= 70 else k["name"][:67] + "..."
    lines.append(f"| `{name}` | {k['class']} | {k['ms_per_step']:.3f} | {k['share']:.1%} | "
                 f"{k['launches_per_step']:.0f} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  try:
    _main(argv)
  except FileNotFoundError as e:
    cli.fail(str(e))


def _main(argv: Sequence[str] | None) -> None:
  p = argparse.ArgumentParser(prog="python -m sovr_jax.profiling",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("logdir", help="a directory holding a jax.profiler trace")
  p.add_argument("--steps", type=int, default=1, help="steps the trace holds (per-step figures)")
  a = p.parse_args(argv)
  print(format_table(read(a.logdir, steps=a.steps)))


if __name__ == "__main__":
  main()
