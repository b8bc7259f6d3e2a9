"""Package metadata for the AuroraGPT-style Megatron + DeepSpeed pretraining framework.

Install (CPU machine; pin torch in the same command, or an unpinned deepspeed pulls a CUDA torch):

    pip install torch==2.13.0 -e ".[test,mpi]"

`bash train_alcf.sh` and `bash tests/run.sh` do this themselves (see ALCF/env.sh).
"""
from setuptools import find_packages, setup

setup(
    name="megatron-alcf",
    version="0.1.0",
    description="Megatron-style LLM pretraining on DeepSpeed ZeRO for Aurora (XPU), NVIDIA GPUs and CPUs",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron", "megatron.*", "tools", "tools.*"]),
    py_modules=["pretrain_gpt", "mix_datasets"],
    install_requires=[
        "torch>=2.2",
        "deepspeed>=0.16",
        "numpy",
        "sentencepiece",
        "tensorboard",
        "transformers",
        "safetensors",
        "packaging",
        "matplotlib",
        "xxhash",  # checkpoint manifests' checksum (zlib's crc32 without it)
    ],
    extras_require={
        # reference implementations the optimizer tests compare against
        # (+ wandb, so its offline-mode test runs; it is never activated unless WANDB_MODE or a login says so)
        # (galore-torch brings bitsandbytes: adam8bit and the GaLore names run in the tests)
        "test": ["pytest", "lion-pytorch", "schedulefree", "torch-optimizer", "pytorch-optimizer", "wandb",
                 "galore-torch"],
        "mpi": ["mpi4py", "mpich"],
        "wandb": ["wandb"],
        "schedulefree": ["schedulefree"],
        # Aurora: torch with XPU support, intel-extension-for-pytorch and oneCCL bindings come from
        # the site's frameworks module (they are not on PyPI for this torch); nothing to install here.
        "xpu": [],
    },
    entry_points={
        "console_scripts": [
            "megatron-pretrain=pretrain_gpt:main",
            "megatron-mix-datasets=mix_datasets:main",
        ],
    },
)
