"""`megatron-prune evaluate checkpoint=<dir> data_dir=<prepared data> [task=...]`"""
import hydra

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage


def _settings(cfg):
    from megatron_prune.evaluate.stage import EvalSettings

    return EvalSettings(
        checkpoint=cfg.checkpoint, data_dir=cfg.data_dir, split=cfg.split, seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size, max_samples=cfg.max_samples, task=str(cfg.task),
        task_seq_length=cfg.task_seq_length, max_task_examples=cfg.max_task_examples)


def _check(cfg, pcfg) -> None:
    """Refuse bad input before start-up: checkpoint, data directory, task, layout vs the model."""
    from megatron_prune.evaluate.stage import validate_settings
    from megatron_prune.models.build import check_divisibility

    _, model_cfg, _, _ = validate_settings(_settings(cfg))
    check_divisibility(model_cfg, pcfg.tp, pcfg.pp)


def _body(cfg, groups, logger):
    from megatron_prune.evaluate.stage import evaluate_checkpoint, write_result

    r = evaluate_checkpoint(_settings(cfg), groups)
    rows = [[f"{cfg.split} loss", r.loss], [f"{cfg.split} perplexity", r.perplexity],
            ["tokens", r.tokens], ["windows", r.samples]]
    metrics = {f"eval/{cfg.split}_loss": r.loss, f"eval/{cfg.split}_perplexity": r.perplexity,
               "eval/tokens": r.tokens}
    if r.mc_acc is not None:
        rows += [["multiple choice acc", r.mc_acc], ["multiple choice acc_norm", r.mc_acc_norm],
                 ["multiple choice examples", r.mc_examples]]
        metrics.update({"eval/mc_acc": r.mc_acc, "eval/mc_acc_norm": r.mc_acc_norm})
    logger.log(metrics)
    logger.summary(metrics)
    logger.echo(f"evaluate {cfg.checkpoint} at {groups.layout}")
    logger.table("eval/results", ["metric", "value"], rows)
    if cfg.output and groups.is_rank0:
        write_result(r, cfg.output)
    return r


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="evaluate")
def app(cfg) -> None:
    run_stage("evaluate", cfg, _body, check=_check)
