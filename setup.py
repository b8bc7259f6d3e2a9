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
        "torch>=2.3",  # torch.compiler.is_compiling (the fused kernels); only 2.13 runs the test suite
        "deepspeed>=0.19,<0.20",  # megatron/deepspeed_compat.SUPPORTED: the range the tests ran on
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
        # (galore-torch, for galoreadamw and its parity test; it brings bitsandbytes, whose 8-bit kernels need CUDA)
        # (cmeel-mimalloc, so --allocator mimalloc's re-execution is tested with the real library)
        "test": ["pytest", "pytest-xdist", "lion-pytorch", "schedulefree", "torch-optimizer", "pytorch-optimizer", "wandb",
                 "galore-torch", "cmeel-mimalloc"],
        # --allocator mimalloc (megatron/resilience/allocator.py)
        "mimalloc": ["cmeel-mimalloc"],
        # mpiexec on a workstation / in CI (MPICH's mpiexec lands in the environment's bin). On a
        # cluster use the site's MPI instead: `pip install mpi4py` builds against the loaded module.
        "mpi": ["mpi4py", "mpich"],
        "wandb": ["wandb"],
        "schedulefree": ["schedulefree"],
        # Aurora / Sunspot: torch with XPU support, intel-extension-for-pytorch and the oneCCL bindings
        # come from the site's frameworks module (`module load frameworks`); they are not on PyPI for
        # these torch builds, so this extra installs only what the module lacks: mpi4py for the
        # MASTER_ADDR exchange under mpiexec (PALS), built against the module's MPI.
        "xpu": ["mpi4py"],
        # NVIDIA machines (Polaris, Sophia, Perlmutter): a CUDA build of torch comes from the site
        # module or from `pip install torch` on Linux x86-64 (PyPI's default wheel is the CUDA one);
        # nccl ships inside it. mpi4py for launching under mpiexec / srun without torchrun.
        "cuda": ["mpi4py"],
        # ALCF's ezpz (used for the distributed set-up when importable). It is not on PyPI: the PyPI
        # package named "ezpz" is an unrelated project, which the trainer detects and ignores.
        "ezpz": ["ezpz @ git+https://github.com/saforem2/ezpz"],
    },
    entry_points={
        "console_scripts": [
            "megatron-pretrain=pretrain_gpt:main",
            "megatron-mix-datasets=mix_datasets:main",
        ],
    },
)
