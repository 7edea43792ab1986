"""Rank-0 W&B logging, read back from the offline run file."""
from __future__ import annotations

import pytest

from megatron_prune.config import ConfigError, LoggerConfig, logger_config_from
from megatron_prune.log import RunLogger, format_table
from tests.wandb_offline import find_runs, read_run


def test_offline_run_holds_config_metrics_summary_and_table(tmp_path):
    log = RunLogger(LoggerConfig(dir=str(tmp_path), group="pipe-1"), "evaluate",
                    {"checkpoint": "ckpt", "parallel": {"tp": 3}}, is_rank0=True)
    log.log({"val/loss": 3.9, "val/perplexity": 52.1})
    log.table("eval/results", ["metric", "value"], [["perplexity", 52.1]])
    log.summary({"perplexity": 52.1})
    log.finish()
    (run_file,) = find_runs(str(tmp_path))
    run = read_run(run_file)
    assert run.group == "pipe-1" and run.job_type == "evaluate"
    assert run.config["parallel"] == {"tp": 3} and run.config["checkpoint"] == "ckpt"
    assert {"val/loss", "val/perplexity"} <= run.history_keys()
    assert run.summary["perplexity"] == pytest.approx(52.1)
    assert any(f.endswith(".table.json") for f in run.files)


def test_only_rank0_and_enabled_loggers_write_runs(tmp_path):
    for cfg, rank0 in [(LoggerConfig(dir=str(tmp_path)), False),
                       (LoggerConfig(kind="none", dir=str(tmp_path)), True)]:
        log = RunLogger(cfg, "convert", {}, is_rank0=rank0)
        log.log({"x": 1})
        log.finish()
    assert find_runs(str(tmp_path)) == []


def test_bad_logger_kind_names_the_field():
    with pytest.raises(ConfigError, match="logger.kind='tensorboard'"):
        logger_config_from({"kind": "tensorboard"})


def test_summary_table_aligns_columns():
    text = format_table(["axis", "params"], [["hidden", 134515008], ["ffn", 1.5]])
    lines = text.splitlines()
    assert lines[0].index("params") == lines[2].index("134,515,008") == lines[3].index("1.5")
