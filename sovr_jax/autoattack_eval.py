"""AutoAttack on a trained model: the robustness figure of a training run.

    python -m sovr_jax.autoattack_eval --workdir runs/sovr                  # reference, standard
    python -m sovr_jax.autoattack_eval --workdir runs/sovr --engine jax     # JAX, no torch
    python -m sovr_jax.autoattack_eval --workdir runs/sovr --engine both --n 1000  # side by side
    python -m sovr_jax.autoattack_eval --workdir runs/sovr --attacks apgd-ce,apgd-t --jax_pgd
    python -m sovr_jax.autoattack_eval --export runs/sovr/export --device cuda
    python -m sovr_jax.autoattack_eval --model tiny_mlp --engine both --n 200 --fast --out c.json
    python -m sovr_jax.autoattack_eval --model preact_resnet18 --worst_case --engine both \
        --n 1000 --batch_size 1000 --device cuda --out t.json   # timings, no trained run

AutoAttack (Croce & Hein, ICML 2020) "standard": APGD-CE, APGD-T, FAB-T, Square on the first
``--n`` test points of the run's data set, each attack on the points still robust. Engines
(``sovr_jax.evaluation``): ``reference`` = pyautoattack (fra31/auto-attack) on the PyTorch
twin, resumable after a kill (run the same command again), every example verified; ``jax`` =
``sovr_jax.attacks.autoattack`` on the JAX model; ``both`` = both on the same points and a
comparison. Every engine writes one result schema (``evaluation/schema.py``: per attack the
robust accuracy, time and points attacked; per point the final robust flag and the attack
that broke it) to W/autoattack.json (reference), W/autoattack_jax.json (jax) and, for both,
W/autoattack_compare.json. A finished result already there is kept, renamed to
``<name>.earlier-<its time>.json``. ``--jax_pgd`` adds the JAX model's PGD-20 / CW-20 on the
same points, UPPER BOUNDS on robust accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import sys
from typing import Any, Sequence

from sovr_jax import cli, jsonio, rundir
from sovr_jax.errors import ConfigError
from sovr_jax.evaluation import settings as settings_lib

ENGINES = ("reference", "jax", "both")
MODELS = ("tiny_mlp", "preact_resnet18", "resnet18", "wrn34_10", "wrn28_10")


def _log(msg: str) -> None:
  print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m sovr_jax.autoattack_eval",
                              description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument("--workdir", help="a training run")
  src.add_argument("--export", help="an export directory (python -m sovr_jax.export); "
                   "reference engine only")
  src.add_argument("--model", choices=MODELS, help="tiny_mlp (a JAX/PyTorch twin on random "
                   "images) or a randomly initialised network (timings only)")
  p.add_argument("--engine", choices=ENGINES, default="reference")
  p.add_argument("--checkpoint", choices=rundir.CHECKPOINT_KINDS, default="best")
  p.add_argument("--n", type=int, default=10000, help="the first N test points")
  p.add_argument("--batch_size", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eps", help="e.g. 0.0314 or 8/255 (default: the run's attack.eps)")
  p.add_argument("--norm", choices=settings_lib.NORMS, help="--model only (default linf)")
  p.add_argument("--attacks", help="comma-separated subset of "
                 f"{', '.join(settings_lib.ATTACKS)} (standard settings)")
  p.add_argument("--version", choices=("standard", "plus", "rand"), default="standard",
                 help="plus / rand: pyautoattack's own versions (reference engine)")
  p.add_argument("--fast", action="store_true",
                 help=f"reduced iterations and queries, for quick checks ({settings_lib.FAST})")
  p.add_argument("--n_iter", type=int, help="APGD/FAB iterations (default 100)")
  p.add_argument("--n_queries", type=int, help="Square queries (default 5000)")
  p.add_argument("--worst_case", action="store_true",
                 help="no point can be broken, so every attack runs in full (timings only)")
  p.add_argument("--attack_dtype", choices=("float32", "bfloat16"), default="float32",
                 help="JAX engine: the dtype the attacks compute in (decisions in float32)")
  p.add_argument("--runs_at_once", type=int, default=1,
                 help="JAX engine: APGD and FAB runs batched into one call (9: the 9 targets "
                      "of APGD-T and FAB-T at once, on 9x the rows; the same points are broken)")
  p.add_argument("--jax_pgd", action="store_true",
                 help="also the JAX model's PGD-20 / CW-20 on the same points (upper bounds)")
  p.add_argument("--device", help="reference engine: cpu or cuda (default: cuda if available)")
  p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: default)")
  p.add_argument("--allow_tf32", action="store_true",
                 help="reference engine on CUDA: TF32 convolutions (faster, not float32-exact)")
  p.add_argument("--matmul_precision", choices=("default", "highest"), default="default",
                 help="JAX engine: 'highest' for float32-exact matmuls on a GPU")
  p.add_argument("--out", help="result JSON (default: in the workdir or export)")
  p.add_argument("--fresh", action="store_true",
                 help="discard an interrupted reference run's state instead of resuming it")
  return p


def _check(args) -> tuple[tuple[str, ...], settings_lib.Settings]:
  if not (args.workdir or args.export or args.model):
    raise ConfigError("Give --workdir (a training run), --export (a directory written by "
                      "python -m sovr_jax.export) or --model.")
  if args.export and args.engine != "reference":
    raise ConfigError(f"--engine {args.engine} needs the JAX model: give --workdir (a "
                      f"training run) instead of --export.")
  if args.engine == "reference" and args.attack_dtype != "float32":
    raise ConfigError("--attack_dtype applies to --engine jax or both; the reference runs in "
                      "float32.")
  if args.engine == "reference" and args.runs_at_once != 1:
    raise ConfigError("--runs_at_once applies to --engine jax or both; the reference "
                      "runs the target classes one after the other.")
  if args.runs_at_once < 1:
    raise ConfigError(f"--runs_at_once must be >= 1, got {args.runs_at_once}.")
  if args.n < 1 or args.batch_size < 1 or args.threads < 0:
    raise ConfigError(f"--n and --batch_size must be >= 1 and --threads >= 0; got {args.n}, "
                      f"{args.batch_size}, {args.threads}.")
  if args.model and not args.out:
    raise ConfigError("--model needs --out (there is no workdir to write into).")
  if args.norm and not args.model:
    raise ConfigError("--norm applies to --model; a run's threat model is its attack.norm.")
  if args.version != "standard" and (args.attacks or args.engine != "reference"):
    raise ConfigError("--version plus|rand runs pyautoattack's own attack list: reference "
                      "engine only, without --attacks.")
  s = settings_lib.FAST if args.fast else settings_lib.Settings()
  if args.n_iter is not None or args.n_queries is not None:
    s = settings_lib.Settings(n_iter=args.n_iter or s.n_iter,
                              n_queries=args.n_queries or s.n_queries)
  return settings_lib.parse_attacks(args.attacks), s


def _target(args, eps):
  from sovr_jax.evaluation import targets  # pylint: disable=import-outside-toplevel
  if args.workdir:
    t = targets.from_run(args.workdir, checkpoint=args.checkpoint, n=args.n, eps=eps,
                         attack_dtype=args.attack_dtype, log=_log)
  elif args.export:
    t = targets.from_export(args.export, n=args.n, eps=eps)
  elif args.model == "tiny_mlp":
    if args.attack_dtype != "float32":
      raise ConfigError("--attack_dtype needs --workdir or a network --model.")
    t = targets.tiny_mlp(args.n, seed=args.seed, eps=eps or 0.02, norm=args.norm or "linf")
  else:
    t = targets.random_network(args.model, args.n, seed=args.seed,
                               attack_dtype=args.attack_dtype)
    t.eps, t.norm = eps or t.eps, args.norm or t.norm
  settings_lib.check_eps(t.eps, t.norm)
  return targets.worst_case(t) if args.worst_case else t


def _out_paths(args, engines) -> dict[str, str]:
  base = args.workdir or (os.path.dirname(os.path.abspath(args.export)) if args.export
                          else None)
  names = {**rundir.AUTOATTACK_FILES, "compare": rundir.AUTOATTACK_COMPARE_FILE}
  if args.out and len(engines) == 1:
    return {engines[0]: os.path.abspath(args.out)}
  if args.out:  # --engine both --out X.json: X_reference.json, X_jax.json and X.json
    stem = os.path.splitext(os.path.abspath(args.out))[0]
    return {"reference": f"{stem}_reference.json", "jax": f"{stem}_jax.json",
            "compare": os.path.abspath(args.out)}
  return {k: os.path.join(os.path.abspath(base), v) for k, v in names.items()}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the evaluation for command-line ``argv``; returns {engine: result} (and
  "compare" for --engine both)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  args.command = "python -m sovr_jax.autoattack_eval " + shlex.join(argv)
  attacks, settings = _check(args)
  eps = settings_lib.parse_eps(args.eps) if args.eps is not None else None
  engines = ("jax", "reference") if args.engine == "both" else (args.engine,)
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch
  if args.matmul_precision == "highest":
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_default_matmul_precision", "highest")
  target = _target(args, eps)
  version = (args.version if args.version != "standard"
             else settings_lib.version(attacks, settings))
  outs = _out_paths(args, engines)
  written = engines + (("compare",) if args.engine == "both" else ())  # this run's files
  with contextlib.ExitStack() as locks:
    for key in written:
      folder, name = os.path.split(outs[key])
      os.makedirs(folder, exist_ok=True)
      # One evaluation per result file: a second one would take the first's resume state
      # for an interrupted run's.
      locks.enter_context(rundir.WorkdirLock(folder, f".{name}.lock",
                                             f"AutoAttack evaluation writing {name}"))
    return _evaluate(args, engines, target, attacks, settings, version,
                     {k: outs[k] for k in written})


def _evaluate(args, engines, target, attacks, settings, version, outs) -> dict[str, Any]:
  """The evaluation itself, its output files locked; ``outs``: the files it writes."""
  from sovr_jax.evaluation import schema  # pylint: disable=import-outside-toplevel
  for key in outs:
    kept = schema.keep_earlier(outs[key])  # a new evaluation never replaces a finished one
    if kept:
      _log(f"An earlier result was at {outs[key]}; kept it as {kept}.")
  upper = None
  if args.jax_pgd and target.upper_bounds is not None:
    _log("JAX PGD-20 / CW-20 on the same points (upper bounds) ...")
    upper = target.upper_bounds(target.x, target.y, eps=target.eps, seed=args.seed,
                                batch_size=args.batch_size)
  results: dict[str, Any] = {}
  for engine in engines:
    _log(f"{engine}: AutoAttack ({version}: {', '.join(attacks)}) on {target.n} points of "
         f"{target.dataset or target.info.get('architecture')}, {target.norm} "
         f"eps={target.eps:.6g}, seed {args.seed}, batch {args.batch_size}.")
    results[engine] = _run_engine(engine, args, target, attacks, settings, version, outs, upper)
  if args.engine == "both":
    from sovr_jax.evaluation import compare  # pylint: disable=import-outside-toplevel
    results["compare"] = cmp = compare.compare(results["jax"], results["reference"])
    cmp.update(files={e: outs[e] for e in engines}, command=args.command)
    jsonio.write_json_atomic(outs["compare"], cmp)
    print(compare.format_table(cmp), flush=True)
  return results


def _run_engine(engine, args, target, attacks, settings, version, outs, upper
                ) -> dict[str, Any]:
  from sovr_jax.evaluation import schema  # pylint: disable=import-outside-toplevel
  if engine == "jax":
    from sovr_jax.evaluation import jax_engine  # pylint: disable=import-outside-toplevel
    result = jax_engine.run(target, attacks=attacks, seed=args.seed,
                            batch_size=args.batch_size, settings=settings, version=version,
                            attack_dtype=args.attack_dtype,
                            runs_at_once=args.runs_at_once, log=_log,
                            partial_out=outs[engine])
  else:
    from sovr_jax.evaluation import reference  # pylint: disable=import-outside-toplevel
    torch = reference.import_torch()
    if args.threads:
      torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
      raise ConfigError(f"--device {device}: CUDA is not available to this PyTorch "
                        f"({torch.__version__}); use --device cpu.")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    if version in reference.PRESETS:
      attacks = reference.preset_attacks(version)
    result = reference.run(target, attacks=attacks, seed=args.seed, batch_size=args.batch_size,
                           device=device, settings=settings, version=version,
                           out=outs[engine], fresh=args.fresh, log=_log)
  if upper is not None:
    result["upper_bounds"] = ub = upper
    result["checks"]["robust_acc_le_pgd20"] = result["robust_acc"] <= ub["pgd20_acc"]
    if not result["checks"]["robust_acc_le_pgd20"]:
      _warn(f"AutoAttack robust accuracy {result['robust_acc']:.4f} is ABOVE the JAX model's "
            f"PGD-20 accuracy {ub['pgd20_acc']:.4f} on the same points: check the export, "
            f"eps, and that the attacks ran on the right model.")
  result["command"] = args.command
  schema.write(outs[engine], result)
  if engine == "reference":
    reference.clear_resume_files(outs[engine])
  after = " | ".join(f"after {a}: {result['robust_acc_after'][a]:.2%} "
                     f"({result['time_s'][a] or 0:.1f} s)" for a in result["attacks"])
  _log(f"{engine}: clean {result['clean_acc']:.2%} | {after} | robust accuracy "
       f"{result['robust_acc']:.2%} -> {outs[engine]}")
  checks = result["checks"]
  if checks.get("flags_disagree"):
    _warn(f"{checks['flags_disagree']} of {result['n']} examples: the robust flags disagree "
          f"with re-evaluating the returned examples (a nondeterministic model?).")
  return result


def _warn(msg: str) -> None:
  bar = "!" * 78
  print(f"{bar}\nWARNING: {msg}\n{bar}", file=sys.stderr, flush=True)


@cli.guarded
def main(argv: Sequence[str] | None = None) -> None:
  """The ``sovr-autoattack`` console entry point."""
  run(argv)


if __name__ == "__main__":
  main()
