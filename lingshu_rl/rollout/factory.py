"""The rollout engine a config asks for, built in the calling process (a rollout worker, or evaluation)."""

from __future__ import annotations

from lingshu_rl.config import ModelConfig, RolloutConfig
from lingshu_rl.rollout.protocol import RolloutEngine


def make_rollout_engine(model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, device: str,
                        vllm_cpu_threads: int | None = 1) -> RolloutEngine:
    """The configured engine; ``auto`` resolves here, in the worker's process (vLLM when importable).
    ``vllm_cpu_threads``: torch threads vLLM runs on CPU (None: the process's own)."""
    from transformers import AutoTokenizer

    from lingshu_rl.rollout.vllm_engine import vllm_available

    engine = rollout_cfg.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() else "transformers"
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
    if engine == "transformers":
        from lingshu_rl.models.hf import DTYPES, pick_device
        from lingshu_rl.rollout.hf_engine import TransformersRollout

        return TransformersRollout(model_path, tokenizer, DTYPES[model_cfg.dtype], pick_device(device),
                                   model_cfg.trust_remote_code)
    if engine == "vllm":  # vLLM picks its own device (its CPU or GPU build); ``device`` does not apply
        from lingshu_rl.rollout.vllm_engine import VLLMRollout

        return VLLMRollout(model_path, tokenizer, model_cfg.dtype, rollout_cfg.tensor_parallel_size,
                           rollout_cfg.gpu_memory_utilization, rollout_cfg.enable_sleep_mode,
                           trust_remote_code=model_cfg.trust_remote_code, cpu_threads=vllm_cpu_threads)
    raise ValueError(f"unknown rollout engine {rollout_cfg.engine!r}")
