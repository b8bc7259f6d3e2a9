"""DeepSpeed's communication set-up, changed before `deepspeed.init_distributed` builds its backend."""
from __future__ import annotations


def skip_shm_inference_op() -> bool:
    """On a CPU, DeepSpeed's torch backend (`deepspeed.comm.torch.TorchBackend`) builds its shared-memory
    all-reduce op (`ShareMemCommBuilder`, a C++ extension compiled on first use in every new environment:
    27 s wall, 53 s of CPU on 2 cores here; longer on slower CPUs) and maps its shared memory. The op
    serves `inference_all_reduce` alone, the tensor-parallel all-reduce of DeepSpeed's inference engine
    and AutoTP layers; this trainer's collectives are torch.distributed's and never call it. Marking
    the op incompatible in DeepSpeed's table (`deepspeed.ops.__compatible_ops__`, which
    `build_shm_op` reads) leaves the backend without it, as on a machine that cannot build it
    (`inference_all_reduce` then falls back to torch.distributed.all_reduce). True when marked; False
    where the accelerator has no such op (CUDA, XPU)."""
    import deepspeed.ops  # noqa: PLC0415
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return False
    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return True
