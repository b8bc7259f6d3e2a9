"""DeepSpeed's import-time work that a training run does not use, deferred to first use."""
from __future__ import annotations

import functools


def defer_muon_compile() -> bool:
    """DeepSpeed decorates the kernels of its own Muon optimizer (`deepspeed.runtime.zero.muon.original_muon`)
    with `torch.compile` at import, and every ZeRO engine imports that module while it is built
    (`is_zero_supported_optimizer`, the ZeRO and bf16 optimizers' Muon checks). Decorating with
    `torch.compile` loads TorchDynamo and Inductor: 2.3 s of CPU per rank here, more than importing torch,
    paid at every start-up although this trainer never builds DeepSpeed's Muon (its own `muon` is
    `megatron/optimizer/muon.py`). From here on, the decorator (`deepspeed.runtime.compiler.compile()`,
    used by that module alone) compiles a function on its first call instead: the same compiled function
    if one is ever called, nothing loaded otherwise. Call before the module is imported (before
    `deepspeed.initialize`); True when changed, False if it was already imported."""
    import sys  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from deepspeed.runtime import compiler  # noqa: PLC0415
    from deepspeed.runtime.zero import muon  # noqa: PLC0415  (an empty package)

    if f"{muon.__name__}.original_muon" in sys.modules:
        return False

    def compile_on_first_call():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)

            return call

        return decorate

    compiler.compile = compile_on_first_call
    return True
