"""`megatron-prune score checkpoint=<dir> data_dir=<prepared data> output=<artifact dir> [depth.*=..]`"""
import hydra

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage
from megatron_prune.log import format_table


def _settings(cfg):
    from megatron_prune.importance.stage import DepthSettings, ScoreSettings

    d = cfg.depth
    return ScoreSettings(
        checkpoint=cfg.checkpoint, data_dir=cfg.data_dir, output=cfg.output, overwrite=cfg.overwrite,
        split=cfg.split, seq_length=cfg.seq_length, max_samples=cfg.max_samples,
        micro_batch_size=cfg.micro_batch_size, sequence=cfg.sequence, batch=cfg.batch,
        backend=cfg.backend, pictures=cfg.pictures,
        depth=DepthSettings(block_size=d.block_size, loss=d.loss, loss_split=d.loss_split,
                            loss_max_samples=d.loss_max_samples, accuracy=d.accuracy, task=str(d.task),
                            task_seq_length=d.task_seq_length, max_task_examples=d.max_task_examples))


def _check(cfg, pcfg) -> None:
    """Refuse bad input before start-up: checkpoint, data, sizes, output, layout vs the model."""
    from megatron_prune.importance.stage import validate_score_settings
    from megatron_prune.models.build import check_divisibility
    from megatron_prune.runtime.distributed import read_launch_env

    world = read_launch_env().world_size
    dp = max(1, world // (pcfg.tp * pcfg.pp))
    checked = validate_score_settings(_settings(cfg), dp_size=dp)
    check_divisibility(checked.model, pcfg.tp, pcfg.pp)


def _ranked(scores, top: int = 3) -> str:
    order = scores.argsort(descending=True).tolist()
    return f"top {order[:top]}  bottom {order[-top:]}"


def _body(cfg, groups, logger):
    from megatron_prune.importance.stage import PICTURES, score_checkpoint

    result = score_checkpoint(_settings(cfg), groups)
    t, meta = result.artifact.tensors, result.artifact.metadata
    rows = [["samples / tokens", f"{meta['samples']} / {meta['tokens']}"],
            ["aggregation", f"{cfg.sequence} over the sequence, {cfg.batch} over samples"],
            ["hidden channels", _ranked(t["width/hidden"])],
            ["block importance (layer)", _ranked(t["depth/block_importance"])]]
    metrics = {"score/samples": meta["samples"], "score/tokens": meta["tokens"],
               "score/bytes_sent_rank0": meta["communication"]["bytes_sent_rank0"]}
    depth = meta["depth"]
    k = cfg.depth.block_size
    if "loss" in depth:  # the block whose removal raises the loss least / keeps the most accuracy
        inc = t["depth/lm_loss_increase_block"]
        j = int(inc.argmin())
        rows.append([f"cheapest block of {k} (LM loss)", f"layers {j}..{j + k - 1}: {float(inc[j]):+.4f} "
                     f"over {depth['loss']['base_loss']:.4f}"])
        metrics["score/base_loss"] = depth["loss"]["base_loss"]
    if "accuracy" in depth:
        acc = t["depth/mc_acc_block"]
        j = int(acc.argmax())
        rows.append([f"cheapest block of {k} (MC acc)", f"layers {j}..{j + k - 1}: {float(acc[j]):.3f} "
                     f"vs {depth['accuracy']['base_acc']:.3f}"])
        metrics["score/base_mc_acc"] = depth["accuracy"]["base_acc"]
    for name, sec in result.seconds.items():
        rows.append([f"time: {name}", f"{sec:.1f} s"])
    logger.summary(metrics)
    _layer_table(logger, t)
    if cfg.pictures:
        for name in PICTURES:
            logger.image(f"score/{name.removesuffix('.png')}", str(result.path / name))
    logger.echo(f"score {cfg.checkpoint} at {groups.layout} -> {result.path}")
    logger.echo(format_table(["importance", "value"], rows))
    return result


def _layer_table(logger, t) -> None:
    """Per-layer depth metrics as a W&B table (and on the console): one row per layer."""
    columns = [("BI", "depth/block_importance"), ("loss without layer", "depth/lm_loss_layer"),
               ("loss increase", "depth/lm_loss_increase_layer")]
    present = [(label, t[name]) for label, name in columns if name in t]
    rows = [[i, *(float(v[i]) for _, v in present)] for i in range(len(t["depth/block_importance"]))]
    logger.table("score/layer_table", ["layer", *(label for label, _ in present)], rows)


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="score")
def app(cfg) -> None:
    run_stage("score", cfg, _body, check=_check)
