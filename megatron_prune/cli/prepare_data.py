"""`megatron-prune prepare-data data.source=<shakespeare | dir | glob> data.output_dir=<dir>`"""
import hydra

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage


def prepare(data_cfg, show_progress: bool = True):
    from megatron_prune.data.indexed import prepare_data

    d = data_cfg
    return prepare_data(
        source=d.source, tokenizer_dir=d.tokenizer_dir, output_dir=d.output_dir,
        fractions=dict(d.fractions), seed=d.seed, overwrite=d.overwrite, show_progress=show_progress,
        task_examples=d.task_examples, task_context_lines=d.task_context_lines,
        task_num_choices=d.task_num_choices)


def summarize(manifest, logger) -> None:
    rows = [[name, s.num_documents, s.num_tokens] for name, s in manifest.splits.items()]
    logger.table("data/splits", ["split", "documents", "tokens"], rows)


def _body(cfg, groups, logger):
    manifest = prepare(cfg.data)
    summarize(manifest, logger)
    logger.echo(f"wrote {cfg.data.output_dir}")
    return manifest


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="prepare_data")
def app(cfg) -> None:
    # Tokenising is a single-process job: no process groups needed.
    run_stage("prepare-data", cfg, _body, needs_runtime=False)
