"""Every accommodation megatron-core 0.16.1 needs to run on CPU (gloo), in one place. Applied only without a GPU.

megatron-core calls CUDA unconditionally in a few places that a CPU run reaches (measured on CPU with
megatron-core 0.16.1 and torch 2.13):
  1. ``torch.cuda.current_device()`` as the device of fresh tensors: the rotary-embedding frequencies, the
     global memory buffer of local dot-product attention, gathers in tensor_parallel/mappings.py. Without CUDA
     that call raises, so it is redirected to return ``"cpu"``.
  2. The RNG tracker (``tensor_parallel.random``) saves and restores CUDA generator states around dropout in
     tensor-parallel regions; ``model_parallel_cuda_manual_seed`` seeds it through the CUDA generator. Its two
     state helpers are redirected to the CPU generator, and :func:`seed_rng_tracker` seeds the tracker's named
     states from CPU generators.
Not patches, but what the engine does on every device for the same reasons (model.py / engine.py):
  * ``use_cpu_initialization=True`` (parameters are built on CPU, filled from the checkpoint, then moved);
  * fusions stay off (megatron-core's defaults; the fused kernels come from Apex/Transformer Engine);
  * an explicit attention mask is always passed (the default causal mask is built with ``device="cuda"``);
  * logits stay vocabulary-parallel (``gather_output=True`` allocates on CUDA).
Sequence parallelism runs on CPU too: the local spec's norms assert against it, so the model uses its own RMSNorm
(``model.py``); gloo has the reduce-scatter and all-gather it needs.
"""

from __future__ import annotations

import torch

_APPLIED = False


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> None:
    """Install the redirections (idempotent). Only call it in a process that has no GPU."""
    global _APPLIED
    if _APPLIED:
        return
    if not needed():
        raise RuntimeError("the megatron engine runs on CPU only where no GPU is visible (set train.device=auto, "
                           "or hide the GPUs with CUDA_VISIBLE_DEVICES=)")
    from megatron.core.tensor_parallel import random as mp_random

    # raised before: no CUDA here; "cpu" where torch declares an int index (megatron passes it on as a device)
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _APPLIED = True


def seed_rng_tracker(seed: int, tp_rank: int) -> None:
    """What ``model_parallel_cuda_manual_seed`` sets up, from CPU generators: the data-parallel, tensor-parallel
    and expert-parallel states with megatron's seed offsets."""
    from megatron.core.tensor_parallel import random as mp_random

    def state(s: int) -> torch.Tensor:
        return torch.Generator().manual_seed(s).get_state()

    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.set_states({
        mp_random._DATA_PARALLEL_RNG_TRACKER_NAME: state(seed),
        mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME: state(seed + 2718 + tp_rank),
        mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME: state(seed + 1024),
    })
