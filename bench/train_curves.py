"""Training curves of the Minitron recipe on SmolLM2-135M: teacher correction, then distillation of
the width-pruned student from the corrected teacher.

    python bench/train_curves.py [--work DIR] [--correct-steps 200] [--distill-steps 200] [--quick]

Runs the real CLI stages as subprocesses (`python -m megatron_prune <stage> ...`, TP1) on the
embedded default (SmolLM2-135M-Instruct and the prepared Shakespeare datasets; `python -m
megatron_prune assets` makes them):
  convert   the cached HF directory -> WORK/teacher (reused whenever it is complete);
  correct   WORK/teacher -> WORK/corrected: LM cross-entropy on the training split for
            --correct-steps steps, the CPU preset conf/correct/smollm2-135m.yaml with the batch,
            sequence, validation and (optionally) learning-rate options of this script;
  score     activation importance of WORK/corrected on --calib-samples calibration windows (width
            only: no depth sweeps, no pictures);
  prune     the default recipe conf/prune/smollm2-135m.yaml (hidden 576->384, FFN 1536->1024) ->
            WORK/student;
  distill   WORK/student from the teacher WORK/corrected, forward KL, --distill-steps steps, the CPU
            preset conf/distill/smollm2-135m.yaml with the same overrides -> WORK/distilled;
  evaluate  perplexity (task=none) of the four models on the training stages' own validation windows
            (the first --eval-samples windows of --seq-length tokens of the validation split).
correct and distill log to W&B offline runs in WORK/wandb (group --group).

The curves come from each training stage's last resumable checkpoint (`train_state.json`: every
step's training metrics and every validation); the W&B run must hold the same val/ values, and the
evaluate stage must reproduce the first and last validation losses (same windows, same weights):
both cross-checks are printed. Prints a table and, as the last line, one JSON object (curves as
lists of [step, value]).

The convert output is reused when complete; with --skip-existing every other complete output is
reused too (rerun with the same --work to resume a broken run), otherwise those stages run again
from scratch (overwrite=true).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

# measure this source tree, not whatever copy of the package is installed
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

PRESET_WARMUP = 10  # conf/correct|distill/smollm2-135m.yaml: train.warmup_steps
QUICK = dict(correct_steps=4, distill_steps=4, eval_interval=2, eval_samples=8, calib_samples=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="work dir (default /tmp/train-curves, or "
                   "/tmp/train-curves-quick with --quick); kept, so a rerun reuses the converted teacher")
    p.add_argument("--correct-steps", type=int, default=200)
    p.add_argument("--distill-steps", type=int, default=100,
                   help="fewer than correct: the KL falls fast, and 2 CPU cores bound the bench's time")
    p.add_argument("--eval-interval", type=int, default=25, help="validation every N training steps")
    p.add_argument("--eval-samples", type=int, default=32, help="validation windows (training and evaluate)")
    p.add_argument("--seq-length", type=int, default=64, help="tokens per window (training and evaluate)")
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr-correct", type=float, default=None,
                   help="peak lr of correct, min_lr lr/10 (default: the preset's)")
    p.add_argument("--lr-distill", type=float, default=None,
                   help="peak lr of distill, min_lr lr/10 (default: the preset's)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows for score")
    p.add_argument("--calib-seq-length", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--group", default="train-curves", help="W&B group of the training runs")
    p.add_argument("--skip-existing", action="store_true",
                   help="reuse every complete stage output in --work (convert's is always reused)")
    p.add_argument("--quick", action="store_true", help="smoke test: a few steps, a few windows (QUICK)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.work is None:
        args.work = "/tmp/train-curves-quick" if args.quick else "/tmp/train-curves"
    args.work = os.path.abspath(args.work)
    return args


class Runner:
    """Runs `python -m megatron_prune <stage>` in the work dir, its output to WORK/logs/<name>.log;
    times it; shows the log's tail on failure."""

    def __init__(self, work: str, skip_existing: bool) -> None:
        self.work = work
        self.skip_existing = skip_existing
        self.t_start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "PYTHONWARNINGS": "ignore", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
        os.makedirs(os.path.join(work, "logs"), exist_ok=True)

    def log(self, msg: str) -> None:
        t = time.perf_counter() - self.t_start
        print(f"[{int(t) // 60:3d}:{int(t) % 60:02d}] {msg}", flush=True)

    def stage(self, name: str, stage: str, overrides: list[str], done: str,
              always_reuse: bool = False) -> bool:
        """Run unless `done` (a file, or a directory with COMPLETE) exists and reuse is allowed;
        returns whether it ran. A rerun replaces the old output (overwrite=true where the stage has it)."""
        exists = os.path.isfile(done) or os.path.isfile(os.path.join(done, "COMPLETE"))
        if exists and (always_reuse or self.skip_existing):
            self.log(f"{name}: reusing {done}")
            return False
        if exists and stage in ("correct", "distill", "score", "prune"):
            overrides = [*overrides, "overwrite=true"]
        cmd = [sys.executable, "-m", "megatron_prune", stage, *overrides]
        self.log(f"{name}: {' '.join(cmd[2:])}")
        log_file = os.path.join(self.work, "logs", name.replace(" ", "_") + ".log")
        t0 = time.perf_counter()
        with open(log_file, "w") as out:
            proc = subprocess.run(cmd, cwd=self.work, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            with open(log_file, errors="replace") as f:
                lines = f.read().replace("\r", "\n").splitlines()
            tail = "\n".join(lines[-40:])
            raise SystemExit(f"{name} failed (rc={proc.returncode}): {' '.join(cmd)}\n"
                             f"log {log_file}:\n{tail}")
        self.log(f"{name}: done in {self.seconds[name]:.0f} s (load average {os.getloadavg()[0]:.1f})")
        return True


def train_overrides(group: str, args: argparse.Namespace, steps: int, lr: float | None) -> list[str]:
    t = f"{group}.train"
    out = [f"{t}.steps={steps}", f"{t}.seq_length={args.seq_length}",
           f"{t}.global_batch_size={args.global_batch}", f"{t}.micro_batch_size={args.micro_batch}",
           f"{t}.eval_interval={args.eval_interval}", f"{t}.eval_samples={args.eval_samples}",
           f"{t}.save_interval=0", f"{t}.keep_checkpoints=1"]  # one resumable checkpoint, at the end
    if steps <= PRESET_WARMUP:  # the preset's warmup must be shorter than the run
        out.append(f"{t}.warmup_steps={steps // 4}")
    if lr is not None:
        out += [f"{t}.lr={lr}", f"{t}.min_lr={lr / 10}"]
    return out


def last_train_state(output: str) -> dict:
    """train_state.json of the newest complete resumable checkpoint of the stage that wrote `output`."""
    from megatron_prune.train.state import STATE_FILE, latest_checkpoint

    latest = latest_checkpoint(output.rstrip("/") + ".checkpoints")
    if latest is None:
        raise SystemExit(f"no resumable checkpoint under {output}.checkpoints: cannot read the curves")
    with open(os.path.join(latest, STATE_FILE)) as f:
        return json.load(f)


def wandb_run(work: str, job_type: str):
    """The newest W&B offline run of `job_type` in the work dir (None if there is none)."""
    from tests.wandb_offline import find_runs, read_run

    for run_file in reversed(find_runs(work)):
        run = read_run(run_file)
        if run.job_type == job_type:
            return run, run_file
    return None, None


def curve(rows: list[dict], key: str, digits: int = 6) -> list[list]:
    return [[r["step"], round(r[key], digits)] for r in rows if key in r]


def compare_wandb(run, validation: list[dict], keys: tuple[str, ...]) -> dict:
    """The W&B run's val/<key> history against train_state.json's validation list."""
    if run is None:
        return {"found": False}
    logged = {(row["_step"], k): row[f"val/{k}"] for row in run.history for k in keys if f"val/{k}" in row}
    diffs, missing = [], []
    for row in validation:
        for k in keys:
            if (row["step"], k) in logged:
                diffs.append(abs(logged[(row["step"], k)] - row[k]))
            else:
                missing.append([row["step"], k])
    return {"found": True, "points": len(diffs), "missing": missing, "max_abs_diff": max(diffs, default=None),
            "matches": not missing and all(d <= 1e-9 for d in diffs)}


def falls(points: list[list]) -> dict:
    """How a validation curve moves: total change and every rise between consecutive points."""
    rises = [[b[0], round(b[1] - a[1], 6)] for a, b in zip(points, points[1:]) if b[1] > a[1]]
    return {"first": points[0][1], "last": points[-1][1], "change": round(points[-1][1] - points[0][1], 6),
            "min": min(v for _, v in points), "rises": rises, "monotone": not rises}


def window_mean(history: list[dict], key: str, end: int, width: int) -> float | None:
    vals = [r[key] for r in history if end - width < r["step"] <= end]
    return sum(vals) / len(vals) if vals else None


def shapes(cfg) -> str:
    return (f"L{cfg.num_layers} h{cfg.hidden_size} ffn{cfg.ffn_hidden_size} "
            f"heads{cfg.num_attention_heads}/{cfg.num_query_groups}")


def run(args: argparse.Namespace) -> dict:
    from megatron_prune.checkpoint import read_model_config
    from megatron_prune.models.params import count_parameters

    work = args.work
    os.makedirs(work, exist_ok=True)
    r = Runner(work, args.skip_existing)
    p = lambda *names: os.path.join(work, *names)  # noqa: E731
    logger = [f"logger.dir={work}", f"logger.group={args.group}"]
    r.log(f"work {work}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")

    r.stage("convert", "convert", [f"output={p('teacher')}", "logger=none"], p("teacher"), always_reuse=True)
    r.stage("correct", "correct", [f"checkpoint={p('teacher')}", f"output={p('corrected')}", *logger,
                                   *train_overrides("correct", args, args.correct_steps, args.lr_correct)],
            p("corrected"))
    r.stage("score", "score", [f"checkpoint={p('corrected')}", f"output={p('importance')}",
                               f"seq_length={args.calib_seq_length}", f"max_samples={args.calib_samples}",
                               f"micro_batch_size={args.micro_batch}", "depth.loss=false",
                               "depth.accuracy=false", "pictures=false", "logger=none"], p("importance"))
    r.stage("prune", "prune", [f"checkpoint={p('corrected')}", f"importance={p('importance')}",
                               f"output={p('student')}", "prune=smollm2-135m", "logger=none"], p("student"))
    r.stage("distill", "distill", [f"student={p('student')}", f"teacher={p('corrected')}",
                                   f"output={p('distilled')}", *logger,
                                   *train_overrides("distill", args, args.distill_steps, args.lr_distill)],
            p("distilled"))

    models = {"teacher": "original teacher", "corrected": "corrected teacher", "student": "pruned student",
              "distilled": "distilled student"}
    evals = {}
    os.makedirs(p("eval"), exist_ok=True)
    for name in models:
        out = p("eval", f"{name}.json")
        r.stage(f"evaluate {name}", "evaluate",
                [f"checkpoint={p(name)}", "split=validation", f"seq_length={args.seq_length}",
                 f"max_samples={args.eval_samples}", f"micro_batch_size={args.micro_batch}", "task=none",
                 f"output={out}", "logger=none"], out)
        with open(out) as f:
            ev = json.load(f)
        cfg = read_model_config(p(name))
        evals[name] = {"model": models[name], "shapes": shapes(cfg), "parameters": count_parameters(cfg),
                       "val_loss": ev["loss"], "val_ppl": ev["perplexity"], "tokens": ev["tokens"]}

    states = {"correct": last_train_state(p("corrected")), "distill": last_train_state(p("distilled"))}
    runs = {k: wandb_run(work, k) for k in states}
    val_keys = {"correct": ("loss", "ce"), "distill": ("loss", "kl", "ce")}  # checked against W&B
    # correct's ce is its loss; distill's loss is its kl (alpha_ce 0)
    curve_keys = {"correct": ("loss",), "distill": ("kl", "ce")}
    stages = {}
    for k, st in states.items():
        with open(p("corrected" if k == "correct" else "distilled", "provenance.json")) as f:
            prov = json.load(f)
        run_obj, run_file = runs[k]
        stages[k] = {"steps": st["step"], "samples": st["consumed_samples"],
                     "train_seconds": round(st["wall_seconds"], 1), "train": prov["train"],
                     "result": prov["result"], "wandb_run": run_file,
                     "wandb_check": compare_wandb(run_obj, st["validation"], val_keys[k]),
                     "tokens_per_s_median": prov["result"].get("tokens_per_s_median")}
        stages[k]["curves"] = {f"val_{key}": curve(st["validation"], key) for key in curve_keys[k]}
        stages[k]["curves"].update({f"train_{key}": curve(st["history"], key) for key in curve_keys[k]})
        stages[k]["curves"]["lr"] = curve(st["history"], "lr", 9)
        stages[k]["curves"]["grad_norm"] = curve(st["history"], "grad_norm", 4)
        main_key = "val_loss" if k == "correct" else "val_kl"
        stages[k]["val_trend"] = falls(stages[k]["curves"][main_key])
        stages[k]["_history"] = st["history"]
    # evaluate reproduces the training stages' validation (same windows, same weights)
    c, d = states["correct"]["validation"], states["distill"]["validation"]
    consistency = {"teacher_vs_correct_step0": evals["teacher"]["val_loss"] - c[0]["loss"],
                   "corrected_vs_correct_last": evals["corrected"]["val_loss"] - c[-1]["loss"],
                   "student_vs_distill_ce_step0": evals["student"]["val_loss"] - d[0]["ce"],
                   "distilled_vs_distill_ce_last": evals["distilled"]["val_loss"] - d[-1]["ce"]}
    settings = {"model": "SmolLM2-135M-Instruct", "data": "Shakespeare (train / validation splits)",
                "layout": "tp1-pp1-dp1", "seq_length": args.seq_length, "global_batch": args.global_batch,
                "micro_batch": args.micro_batch, "tokens_per_step": args.seq_length * args.global_batch,
                "correct_steps": args.correct_steps, "distill_steps": args.distill_steps,
                "eval_interval": args.eval_interval, "eval_samples": args.eval_samples,
                "eval_tokens": evals["teacher"]["tokens"], "lr_correct": stages["correct"]["train"]["lr"],
                "lr_distill": stages["distill"]["train"]["lr"], "calib_samples": args.calib_samples,
                "calib_seq_length": args.calib_seq_length, "prune_recipe": "smollm2-135m",
                "quick": args.quick,
                "cores": os.cpu_count()}
    return {"settings": settings, "stages": stages, "eval": evals, "eval_vs_training_validation": consistency,
            "seconds": r.seconds, "total_seconds": round(time.perf_counter() - r.t_start, 1),
            "loadavg_1min_end": round(os.getloadavg()[0], 2)}


def _f(x, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def print_table(result: dict) -> None:
    s, st = result["settings"], result["stages"]
    corr, dist = st["correct"], st["distill"]
    print(f"\nSmolLM2-135M-Instruct on Shakespeare, TP1: correct {s['correct_steps']} steps "
          f"(lr {s['lr_correct']:g}), distill {s['distill_steps']} steps (lr {s['lr_distill']:g}); "
          f"global batch {s['global_batch']} x "
          f"{s['seq_length']} tokens; validation every {s['eval_interval']} steps on the first "
          f"{s['eval_samples']} validation windows ({s['eval_tokens']} targets).")
    cv = dict(map(tuple, corr["curves"]["val_loss"]))
    dk, dc = dict(map(tuple, dist["curves"]["val_kl"])), dict(map(tuple, dist["curves"]["val_ce"]))
    w = s["eval_interval"] or max(s["correct_steps"], s["distill_steps"])
    head = ["step", "correct val/loss", f"train/loss (mean {w})", "distill val/kl", f"train/kl (mean {w})",
            "distill val/ce"]
    rows = []
    for step in sorted(set(cv) | set(dk)):
        rows.append([step, _f(cv.get(step)),
                     _f(window_mean(corr["_history"], "loss", step, w)) if step in cv and step else "-",
                     _f(dk.get(step)),
                     _f(window_mean(dist["_history"], "kl", step, w)) if step in dk and step else "-",
                     _f(dc.get(step))])
    _print_rows(head, rows)
    for name, key in (("correct", "val/loss"), ("distill", "val/kl")):
        t = st[name]["val_trend"]
        print(f"{name} {key}: {t['first']:.4f} -> {t['last']:.4f} ({t['change']:+.4f}); "
              + ("falls at every validation" if t["monotone"] else f"rises at {t['rises']} ([step, rise])"))
    print()
    head = ["model", "shapes", "parameters", "val loss", "val ppl"]
    rows = [[e["model"], e["shapes"], f"{e['parameters']:,}", f"{e['val_loss']:.4f}", f"{e['val_ppl']:.2f}"]
            for e in result["eval"].values()]
    _print_rows(head, rows)
    cons = result["eval_vs_training_validation"]
    print("evaluate vs the training stages' validation (same windows): "
          + ", ".join(f"{k} {v:+.1e}" for k, v in cons.items()))
    for name in ("correct", "distill"):
        chk = st[name]["wandb_check"]
        if not chk["found"]:
            print(f"W&B {name} run: not found")
            continue
        print(f"W&B {name} run: {chk['points']} val points, max |diff| vs train_state.json "
              f"{chk['max_abs_diff']:.1e}, missing {chk['missing']} -> "
              f"{'matches' if chk['matches'] else 'DIFFERS'}")
    print()
    head = ["stage", "wall s", "training s", "tokens/s (median step)"]
    rows = []
    for name, sec in result["seconds"].items():
        key = name if name in st else None
        rows.append([name, f"{sec:.0f}", f"{st[key]['train_seconds']:.0f}" if key else "-",
                     _f(st[key]["tokens_per_s_median"], ".1f") if key else "-"])
    _print_rows(head, rows)
    print(f"wall time {result['total_seconds'] / 60:.1f} min; load average at the end "
          f"{result['loadavg_1min_end']} on {s['cores']} cores")


def _print_rows(head: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for n, line in enumerate([head, *rows]):
        print("  ".join(str(x).ljust(wd) for x, wd in zip(line, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * wd for wd in widths))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    for stage in result["stages"].values():
        stage.pop("_history")
    print(json.dumps(result, allow_nan=True))


if __name__ == "__main__":
    main()
