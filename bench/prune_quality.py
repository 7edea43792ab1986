"""Quality of pruning SmolLM2-135M before distillation: activation importance vs random (and magnitude).

    python bench/prune_quality.py [--workdir DIR] [--calib-samples 64] [--eval-samples 32] [--seeds 0,1,2]

Runs the real CLI stages as subprocesses (`python -m megatron_prune <stage> ... logger=none`, TP1) on
the embedded default (SmolLM2-135M-Instruct and the prepared Shakespeare datasets; `python -m
megatron_prune assets` makes them):
  convert   the cached HF directory -> WORKDIR/base;
  score     once: width importance from --calib-samples calibration windows of --seq-length tokens,
            Block Importance from the same pass, and the LM-loss sweep (each layer and each block of
            10 layers removed) on --loss-samples validation windows; no accuracy sweep;
  prune     width recipe `prune=smollm2-135m-width` (hidden 576->384, FFN 1536->1024; heads, groups and
            depth kept) with importance activation, magnitude and random (--seeds); depth recipe
            `prune=smollm2-135m-depth` (30->20 layers) with activation by lm_loss_block (the recipe's
            default: the contiguous block of 10 whose removal raises the LM loss least),
            block_importance_block (the 10-block of least Block Importance) and lm_loss_layer (the 10
            individually cheapest layers), and random (--seeds: random scores with the block metric
            pick a uniformly random contiguous block of 10; magnitude has no depth scores and is refused);
  evaluate  the base model and every pruned one on the first --eval-samples windows of --seq-length
            tokens of the validation split (held-out plays), `task=none` unless --task default.
Nothing is distilled: these are the one-shot pruned models.

The score's LM-loss sweep reads the validation split (the first --loss-samples windows, a subset of
the evaluation windows): the depth choice by lm_loss_* has seen a little of the text it is evaluated
on. Block Importance and every width score come from the calibration split only.

Stages whose output already exists in --workdir are reused (rerun with the same --workdir to resume).
Prints progress, a table, and as the last line one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

# measure this source tree, not whatever copy of the package is installed
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WIDTH_RECIPE = "smollm2-135m-width"
DEPTH_RECIPE = "smollm2-135m-depth"
BLOCK = 10  # layers the depth recipe drops (30 -> 20): the score's depth.block_size
DEPTH_METRICS = ("lm_loss_block", "block_importance_block", "lm_loss_layer")


def seeds_arg(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a new temp dir, removed "
                   "at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temp workdir")
    p.add_argument("--source", default=None, help="HF dir for convert (default: conf/convert.yaml's, the cache)")
    p.add_argument("--data-dir", default=None, help="prepared data dir (default: the stages' default, the cache)")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows for score (paper: 1024)")
    p.add_argument("--loss-samples", type=int, default=3, help="validation windows per depth LM-loss evaluation")
    p.add_argument("--eval-samples", type=int, default=32, help="validation windows for evaluate")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seeds", type=seeds_arg, default=[0, 1, 2], help="random-importance seeds")
    p.add_argument("--task", default="none", help="evaluate's task: none (default) | default (multiple choice)")
    return p.parse_args(argv)


class Runner:
    """Runs `python -m megatron_prune <stage>` in the workdir; times it; shows the tail on failure."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.t_start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "PYTHONWARNINGS": "ignore"}

    def log(self, msg: str) -> None:
        t = time.perf_counter() - self.t_start
        print(f"[{int(t) // 60:3d}:{int(t) % 60:02d}] {msg}", flush=True)

    def stage(self, name: str, stage: str, overrides: list[str], done: str) -> None:
        """Run unless `done` (a file or a checkpoint/artifact dir with COMPLETE) already exists."""
        if os.path.isfile(done) or os.path.isfile(os.path.join(done, "COMPLETE")):
            self.log(f"{name}: reusing {done}")
            return
        cmd = [sys.executable, "-m", "megatron_prune", stage, *overrides, "logger=none"]
        self.log(f"{name}: {' '.join(cmd[2:])}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.workdir, env=self.env, capture_output=True, text=True)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise SystemExit(f"{name} failed (rc={proc.returncode}): {' '.join(cmd)}\n{tail}")
        self.log(f"{name}: done in {self.seconds[name]:.0f} s (load average {os.getloadavg()[0]:.1f})")


def variants(seeds: list[int]) -> list[dict]:
    """name, recipe, Hydra overrides of the prune stage."""
    out = [{"name": "width/activation", "target": "width", "importance": "activation", "choice": "top-k",
            "overrides": [f"prune={WIDTH_RECIPE}", "prune.importance=activation"]},
           {"name": "width/magnitude", "target": "width", "importance": "magnitude", "choice": "top-k",
            "overrides": [f"prune={WIDTH_RECIPE}", "prune.importance=magnitude"]}]
    out += [{"name": f"width/random-{s}", "target": "width", "importance": "random", "seed": s, "choice": "top-k",
             "overrides": [f"prune={WIDTH_RECIPE}", "prune.importance=random", f"prune.seed={s}"]} for s in seeds]
    out += [{"name": f"depth/activation-{m}", "target": "depth", "importance": "activation", "choice": m,
             "overrides": [f"prune={DEPTH_RECIPE}", "prune.importance=activation",
                           f"prune.target.depth_metric={m}"]} for m in DEPTH_METRICS]
    out += [{"name": f"depth/random-{s}", "target": "depth", "importance": "random", "seed": s,
             "choice": "random block",
             "overrides": [f"prune={DEPTH_RECIPE}", "prune.importance=random", f"prune.seed={s}"]} for s in seeds]
    return out


def shapes(cfg: dict) -> str:
    return (f"L{cfg['num_layers']} h{cfg['hidden_size']} ffn{cfg['ffn_hidden_size']} "
            f"heads{cfg['num_attention_heads']}/{cfg['num_query_groups']}")


def dropped_layers(plan: dict) -> list[int]:
    kept = set(plan["keep_layers"])
    return [i for i in range(plan["source"]["num_layers"]) if i not in kept]


def layer_ranges(layers: list[int]) -> str:
    """[9, 10, 11, 20] -> "9-11,20"."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}-{layer}" if layer != start else f"{layer}")
            start = None
    return ",".join(parts) or "-"


def run(args: argparse.Namespace, workdir: str) -> dict:
    r = Runner(workdir)
    p = lambda *names: os.path.join(workdir, *names)  # noqa: E731
    data = [f"data_dir={args.data_dir}"] if args.data_dir else []
    r.log(f"workdir {workdir}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")

    r.stage("convert", "convert", [f"output={p('base')}", *([f"source={args.source}"] if args.source else [])],
            p("base"))
    r.stage("score", "score", [f"checkpoint={p('base')}", f"output={p('importance')}", *data,
                               f"seq_length={args.seq_length}", f"max_samples={args.calib_samples}",
                               f"micro_batch_size={args.micro_batch_size}", f"depth.block_size={BLOCK}",
                               "depth.loss=true", f"depth.loss_max_samples={args.loss_samples}",
                               "depth.accuracy=false"], p("importance"))
    meta = json.load(open(p("importance", "importance.json")))

    def evaluate(name: str, ckpt: str) -> dict:
        out = p("eval", name.replace("/", "_") + ".json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        r.stage(f"evaluate {name}", "evaluate",
                [f"checkpoint={ckpt}", *data, "split=validation", f"seq_length={args.seq_length}",
                 f"max_samples={args.eval_samples}", f"micro_batch_size={args.micro_batch_size}",
                 f"task={args.task}", f"output={out}"], out)
        return json.load(open(out))

    rows = []
    base_eval = evaluate("base", p("base"))
    base_cfg = json.load(open(p("base", "model_config.json")))
    rows.append({"name": "base", "target": "-", "importance": "-", "choice": "-", "shapes": shapes(base_cfg),
                 "dropped_layers": [], "parameters": None, **_metrics(base_eval)})
    for v in variants(args.seeds):
        ckpt = p("pruned", v["name"].replace("/", "_"))
        os.makedirs(p("pruned"), exist_ok=True)
        r.stage(f"prune {v['name']}", "prune",
                [f"checkpoint={p('base')}", f"importance={p('importance')}", f"output={ckpt}", *v["overrides"]], ckpt)
        plan = json.load(open(os.path.join(ckpt, "plan.json")))
        rows.append({"name": v["name"], "target": v["target"], "importance": v["importance"],
                     "seed": v.get("seed"), "choice": v["choice"], "shapes": shapes(plan["target"]),
                     "dropped_layers": dropped_layers(plan), "parameters": plan["parameters"]["after"],
                     **_metrics(evaluate(v["name"], ckpt))})
        rows[0]["parameters"] = plan["parameters"]["before"]
    settings = {"seq_length": args.seq_length, "calibration_samples": meta["samples"],
                "calibration_tokens": meta["tokens"], "depth_block_size": BLOCK,
                "depth_loss_samples": meta["depth"]["loss"]["samples"],
                "depth_loss_base": meta["depth"]["loss"]["base_loss"], "eval_split": "validation",
                "eval_samples": args.eval_samples, "eval_tokens": base_eval["tokens"], "task": args.task,
                "seeds": args.seeds, "aggregation": meta["aggregation"], "layout": "tp1-pp1-dp1"}
    return {"settings": settings, "rows": rows, "seconds": r.seconds,
            "total_seconds": round(time.perf_counter() - r.t_start, 1)}


def _metrics(ev: dict) -> dict:
    out = {"val_loss": ev["loss"], "val_ppl": ev["perplexity"], "eval_tokens": ev["tokens"]}
    if ev.get("mc_acc") is not None:
        out.update(mc_acc=ev["mc_acc"], mc_acc_norm=ev["mc_acc_norm"])
    return out


def summary(result: dict) -> dict:
    """Per target: activation's perplexity against the random seeds' (min / geometric mean / max)."""
    rows = {row["name"]: row for row in result["rows"]}
    out = {}
    for target, act in (("width", "width/activation"), ("depth", "depth/activation-lm_loss_block")):
        rand = [row["val_ppl"] for row in result["rows"] if row["target"] == target and row["importance"] == "random"]
        a = rows[act]["val_ppl"]
        out[target] = {"activation_ppl": a, "random_ppl": rand, "random_ppl_min": min(rand),
                       "random_ppl_max": max(rand),
                       "random_ppl_geomean": math.exp(sum(math.log(x) for x in rand) / len(rand)),
                       "best_random_over_activation": min(rand) / a,
                       "activation_beats_every_seed": all(a < x for x in rand)}
    out["width"]["magnitude_ppl"] = rows["width/magnitude"]["val_ppl"]
    return out


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"\nSmolLM2-135M-Instruct, one-shot pruning (no distillation). Calibration {s['calibration_samples']} "
          f"windows x {s['seq_length']} tokens ({s['calibration_tokens']} tokens); depth LM-loss sweep on "
          f"{s['depth_loss_samples']} validation windows; evaluation: first {s['eval_samples']} validation "
          f"windows of {s['seq_length']} tokens ({s['eval_tokens']} targets).")
    head = ["variant", "importance", "layers chosen by", "shapes", "params", "dropped layers", "val loss", "val ppl"]
    mc = any("mc_acc" in row for row in result["rows"])
    if mc:
        head.append("mc acc / norm")
    lines = []
    for row in result["rows"]:
        imp = row["importance"] + (f" (seed {row['seed']})" if row.get("seed") is not None else "")
        line = [row["name"], imp, row["choice"] if row["target"] == "depth" else "-", row["shapes"],
                f"{row['parameters']:,}", layer_ranges(row["dropped_layers"]), f"{row['val_loss']:.4f}",
                f"{row['val_ppl']:.2f}"]
        if mc:
            line.append(f"{row['mc_acc']:.2f} / {row['mc_acc_norm']:.2f}" if "mc_acc" in row else "-")
        lines.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    for n, line in enumerate([head, *lines]):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for target, d in result["summary"].items():
        print(f"{target}: activation ppl {d['activation_ppl']:.2f}; random {', '.join(f'{x:.2f}' for x in d['random_ppl'])} "
              f"(best random / activation = {d['best_random_over_activation']:.2f}x)"
              + (f"; magnitude {d['magnitude_ppl']:.2f}" if "magnitude_ppl" in d else ""))
    print(f"wall time {result['total_seconds'] / 60:.1f} min; per stage (s): {result['seconds']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        result = run(args, os.path.abspath(args.workdir))
    elif args.keep:
        result = run(args, tempfile.mkdtemp(prefix="prune-quality-"))
    else:
        with tempfile.TemporaryDirectory(prefix="prune-quality-") as tmp:
            result = run(args, tmp)
    result["summary"] = summary(result)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":  # megatron's checkpoint writer spawns processes
    main()
