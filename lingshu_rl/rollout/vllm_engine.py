"""Rollout engine on vLLM, living inside a rollout Ray actor (``rollout.engine: vllm``).

Sampling settings mean what they mean for the transformers engine: temperature 0 is greedy, top-k 0 is off,
generation stops at the end-of-turn token (kept as the last response token) or after a stop string, and
``seed`` makes a call reproducible. With the engine in this process and one worker (what runs on CPU), the
seed goes to torch's global generator before the call, as in the transformers engine: vLLM's sampler draws
from it for requests without a seed of their own, while per-request seeds cost a generator and a Python loop
per request and decoding step (measured: 0.53 s instead of 0.37 s for 64 x 32 tokens of the tiny model).
Otherwise (engine worker processes) each prompt gets its own seed drawn from ``seed``.

Sampling log-probs: the distribution the training engine computes
-----------------------------------------------------------------
Each response carries vLLM's own log-prob of every sampled token, used only for the rollout-vs-training
mismatch metric (``rollout/logprob_abs_diff``) and the optional truncated importance-sampling correction; the
loss always uses the training engine's log-probs. They are log-probs of the same distribution the training
engine computes: ``log_softmax(logits / temperature)`` over the full vocabulary, whatever ``top_p`` / ``top_k``
are. vLLM has no log-prob mode for exactly that (vllm 0.32: ``raw_logprobs`` / ``raw_logits`` are taken before
the temperature; ``processed_logprobs`` after top-k/top-p, renormalised over the kept tokens, which is biased by
the log of the kept mass; ``processed_logits`` are not normalised), so the temperature is moved into the model: the
``scale`` of vLLM's logits processor (where it applies a model's own logit scale, 1 for Qwen2 and Llama) is
divided by the temperature, vLLM samples at temperature 1, and ``logprobs_mode="raw_logprobs"`` returns
``log_softmax(logits / temperature)``. Sampling is unchanged: vLLM applies the temperature before top-k/top-p
anyway. (In bfloat16 the scaled logits are rounded to bfloat16 once more; vLLM's
``hf_overrides={"head_dtype": "float32"}`` keeps the head in float32.)

How new weights reach vLLM after each update (in place: no files, no engine restart)
------------------------------------------------------------------------------------
1. To the rollout actor (:mod:`lingshu_rl.grpo.sync`): by default the actor's rank 0 broadcasts the weights
   over a process group it shares with the rollout workers, bucket by bucket (:mod:`lingshu_rl.models.transfer`),
   and ``load_weights`` gets a stream of ``(name, tensor)`` pairs that receives each bucket when the loader reaches
   it. With ``rollout.weight_sync: object_store`` it gets the whole state dict from Ray's object store.
2. Into the engine: ``llm.collective_rpc(_reload_weights, args=(weights,))``. With one engine worker run
   in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless you set it; what runs on CPU) this is a plain
   function call, so the stream goes straight through; with tensor parallelism vLLM pickles the arguments to each
   of its worker processes, so a stream is first collected into one dict (GPU only, untested). On each worker,
   ``worker.reload_weights(weights_iterator=...)`` runs the model's own ``load_weights`` (Hugging Face names ->
   vLLM's fused qkv / gate_up parameters, tied embeddings skipped), copies into the existing parameters and
   re-runs the post-load processing (on CPU: repacking each linear layer for oneDNN).
3. ``llm.reset_prefix_cache()``: cached KV blocks were computed with the old weights.
A colocated engine sharing the trainer's GPU could take CUDA IPC handles instead of a copy; that is not built.

Colocated on one GPU (``rollout.enable_sleep_mode``) -- UNTESTED: no GPU was available when this was written;
it follows vLLM's documented sleep-mode API (``LLM(enable_sleep_mode=True)``, ``sleep(level=1)``,
``wake_up(tags=[...])``). After generating, the engine sleeps (level 1: weights offloaded to CPU, KV cache
freed) so the actor's update has the GPU memory; ``load_weights`` wakes the weights first, reloads them, then
wakes the KV cache. ``generate`` wakes a sleeping engine itself (e.g. when a step skipped its update), which
is why level 1 (weights kept) is used rather than level 2. ``rollout.gpu_memory_utilization`` is the fraction
of GPU memory vLLM may take for weights + KV cache. vLLM has no sleep mode on CPU; asking for it raises.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lingshu_rl.data.vision import IMAGE_PAD, VisionInputs, compact_image_pads
from lingshu_rl.models.hf import placeholder_token_ids
from lingshu_rl.models.probe import capture
from lingshu_rl.rollout.protocol import Generation, SamplingParams

if TYPE_CHECKING:  # vLLM is an optional dependency
    from vllm.inputs import TokensPrompt
    from vllm.logprobs import FlatLogprobs, Logprob

# vLLM's KV cache on CPU (unless VLLM_CPU_KVCACHE_SPACE, in GiB, says otherwise): room for this many tokens of
# the model, at most 1 GiB (a batch of 64 responses to 1,024-token prompts fits; vLLM queues what does not)
CPU_KV_CACHE_TOKENS, CPU_KV_CACHE_MAX_BYTES = 65_536, 1 << 30
MAX_IMAGES_PER_PROMPT = 4  # images vLLM reserves room for per prompt (vision-language models)


def vllm_available() -> bool:
    """True when vLLM can be imported (what ``rollout.engine: auto`` checks)."""
    return importlib.util.find_spec("vllm") is not None


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a response: ``<|im_end|>`` when the vocabulary has it, and the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    ids = {vocab["<|im_end|>"]} if "<|im_end|>" in vocab else set()
    return sorted(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def cpu_kv_cache_bytes(config: Any, dtype: str) -> int:
    """The KV cache for :data:`CPU_KV_CACHE_TOKENS` tokens of the model whose Hugging Face config is ``config``
    (keys and values of every layer)."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = 2 * text.num_hidden_layers * (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    return min(CPU_KV_CACHE_MAX_BYTES, per_token * (4 if dtype == "float32" else 2) * CPU_KV_CACHE_TOKENS)


def _reload_weights(worker: Any, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
    """Runs on every vLLM worker (``collective_rpc``): in-place reload from Hugging Face-named tensors."""
    worker.reload_weights(weights_iterator=iter(weights.items() if isinstance(weights, Mapping) else weights))


def _vllm_module_names(worker: Any, modules: list[str]) -> dict[str, str]:
    """vLLM's name of each Hugging Face module (its model's own name mapping), for the modules it has."""
    model = worker.get_model()
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    own = dict(model.named_modules())
    names = {}
    for module in modules:
        mapped = mapper.map_name(f"{module}.weight") if mapper is not None else f"{module}.weight"
        if mapped is not None and mapped.removesuffix(".weight") in own:
            names[mapped.removesuffix(".weight")] = module
    return names


def _start_probe(worker: Any, names: dict[str, str]) -> None:
    recording = capture(worker.get_model(), names)
    worker.lingshu_probe = (recording, recording.__enter__())


def _stop_probe(worker: Any) -> dict[str, Tensor]:
    recording, outputs = worker.__dict__.pop("lingshu_probe")
    recording.__exit__(None, None, None)
    return dict(outputs)


def _divide_logits_by(worker: Any, temperature: float) -> None:
    """Runs on every vLLM worker (``collective_rpc``): the model's logits come out divided by ``temperature``."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    for module in worker.get_model().modules():
        if isinstance(module, LogitsProcessor):
            own = module.__dict__.setdefault("lingshu_model_scale", module.scale)  # the model's own logit scale
            module.scale = own / temperature


def _sampled_logprobs(steps: FlatLogprobs | list | None, ids: list[int]) -> list[float] | None:
    """The sampled token's log-prob at each step (``logprobs=0``: the sampled token is always listed)."""
    from vllm.logprobs import FlatLogprobs

    if steps is None:
        return None
    if isinstance(steps, FlatLogprobs):
        return [steps.logprobs[steps.token_ids.index(token, start, end)]
                for token, start, end in zip(ids, steps.start_indices, steps.end_indices)]
    return [cast("dict[int, Logprob]", step)[token].logprob for step, token in zip(steps, ids)]


class VLLMRollout:
    def __init__(self, model_path: str, tokenizer: PreTrainedTokenizerBase,
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, enable_sleep_mode: bool = False,
                 seed: int = 0, trust_remote_code: bool = False, cpu_threads: int | None = 1):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: no pickled weights
        import vllm
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if enable_sleep_mode and on_cpu:
            raise ValueError("rollout.enable_sleep_mode needs a GPU: vLLM has no sleep mode on CPU")
        # On CPU vLLM keeps the torch threads it finds when OMP_NUM_THREADS is set (Ray sets it for its workers)
        # and forbids changing them afterwards: ``cpu_threads`` (None: keep this process's). One thread in a
        # rollout worker of its own (measured faster there, even on an idle machine); a hybrid worker keeps the
        # threads its trainer uses (lingshu_rl.grpo.workers.HybridWorker).
        if on_cpu and cpu_threads:
            torch.set_num_threads(cpu_threads)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        extra: dict[str, Any] = {}
        if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            extra["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(config, dtype)
        self.multimodal = hasattr(config, "vision_config")
        # never sampled (-inf: vLLM clamps a bias to +-100 only in from_optional, and a placeholder's logit can exceed
        # it); the returned log-probs stay the raw model's (logprobs_mode below), as the trainer computes them
        self.banned = dict.fromkeys(placeholder_token_ids(config), float("-inf"))
        if self.multimodal:
            from lingshu_rl.models.tiny_vl import enable_qwen_vl_without_torchvision

            enable_qwen_vl_without_torchvision(vllm=True)  # a no-op where torchvision is installed
            extra["limit_mm_per_prompt"] = {"image": MAX_IMAGES_PER_PROMPT, "video": 0}
        self.llm = vllm.LLM(
            model=model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
            trust_remote_code=trust_remote_code, enforce_eager=on_cpu, enable_prefix_caching=True,
            generation_config="vllm",  # stop tokens are ours (as in the transformers engine), not generation_config's
            logprobs_mode="raw_logprobs", **extra)  # with the temperature in the model: the trainer's log-probs
        self.tokenizer, self.sleep_mode, self.asleep = tokenizer, enable_sleep_mode, False
        self.logit_temperature = 1.0  # what the model's logits are divided by now
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and tensor_parallel_size == 1
        self.eos_ids = end_of_turn_ids(tokenizer)
        self.device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[VisionInputs | None] | None = None) -> list[Generation]:
        from vllm import SamplingParams as VLLMSamplingParams

        self._wake()
        greedy = params.temperature == 0
        self._set_logit_temperature(1.0 if greedy else params.temperature)  # see "Sampling log-probs" above
        copies, n = (params.n, 1) if greedy else (1, params.n)  # vLLM refuses n > 1 with greedy: repeat prompts
        expanded = [p for p in prompts for _ in range(copies)]
        visions = [v for v in (images or [None] * len(prompts)) for _ in range(copies)]
        rng = random.Random(params.seed)
        if self.in_process:  # the sampler draws from this process's global generator (see the module docstring)
            torch.manual_seed(params.seed)
        requests = [VLLMSamplingParams(
            n=n, temperature=0.0 if greedy else 1.0, top_p=1.0 if greedy else params.top_p,
            top_k=0 if greedy else params.top_k, max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=self.eos_ids, seed=None if self.in_process else rng.getrandbits(31), logprobs=0,
            logit_bias=self.banned or None,
            flat_logprobs=True,  # a few flat lists per response, not a dict and an object per token
            detokenize=bool(params.stop))  # text is decoded below, as the transformers engine does
            for _ in expanded]
        outputs = self.llm.generate([self._request(p, v) for p, v in zip(expanded, visions)], requests, use_tqdm=False)
        samples = [(prompt, sample) for prompt, output in zip(expanded, outputs)
                   for sample in sorted(output.outputs, key=lambda c: c.index)]  # n per prompt, grouped by prompt
        texts = self.tokenizer.batch_decode([list(s.token_ids) for _, s in samples], skip_special_tokens=True)
        generations = [Generation(list(prompt), list(sample.token_ids), text,
                                  "stop" if sample.finish_reason == "stop" else "length",
                                  _sampled_logprobs(sample.logprobs, list(sample.token_ids)))
                       for (prompt, sample), text in zip(samples, texts)]
        if self.sleep_mode:  # free the GPU for the actor's update until the next load_weights
            self.llm.sleep(level=1)
            self.asleep = True
        return generations

    def _set_logit_temperature(self, temperature: float) -> None:
        if temperature != self.logit_temperature:
            self.llm.collective_rpc(_divide_logits_by, args=(temperature,))
            self.logit_temperature = temperature

    def _request(self, prompt: list[int], vision: VisionInputs | None) -> TokensPrompt:
        if vision is None:
            return {"prompt_token_ids": prompt}
        if not self.multimodal:
            raise ValueError("a prompt has images but the model has no vision tower")
        # vLLM expands one <|image_pad|> per image itself (and would expand an expanded prompt again, silently)
        pad_id = cast(int, self.tokenizer.convert_tokens_to_ids(IMAGE_PAD))
        return {"prompt_token_ids": compact_image_pads(prompt, pad_id), "multi_modal_data": {"image": vision.images}}

    def load_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        if not self.in_process:  # vLLM pickles the arguments to its worker processes: a stream cannot go
            weights = dict(weights)  # (GPU with tensor_parallel_size > 1, untested: one dict, as Ray's path has)
        if self.asleep:  # GPU only (untested here): weights first, the KV cache only once they are loaded
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_reload_weights, args=(weights,))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()
        if self.multimodal:  # cached image embeddings were computed by the old vision tower
            self.llm.llm_engine.reset_encoder_cache()

    def score(self, prompt: list[int], response: list[int], vision: VisionInputs | None = None) -> list[float]:
        from vllm import SamplingParams as VLLMSamplingParams

        self._wake()
        self._set_logit_temperature(1.0)
        request = self._request(prompt + response, vision)
        params = VLLMSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        steps = self.llm.generate([request], params, use_tqdm=False)[0].prompt_logprobs
        assert steps is not None
        # one {token: Logprob} per prompt position (None for the first); the response is the prompt's tail
        return [cast("dict[int, Logprob]", step)[token].logprob
                for step, token in zip(steps[len(steps) - len(response):], response)]

    def probe(self, prompt: list[int], response: list[int], vision: VisionInputs | None,
              modules: list[str]) -> dict[str, Tensor]:
        """Each of ``modules``' (Hugging Face names) output while scoring the response, from vLLM's own modules
        (:mod:`lingshu_rl.models.probe`); the prefix and image caches are dropped first so that every token and
        image is computed."""
        names = self.llm.collective_rpc(_vllm_module_names, args=(modules,))[0]
        self.llm.reset_prefix_cache()
        if self.multimodal:
            self.llm.llm_engine.reset_encoder_cache()
        self.llm.collective_rpc(_start_probe, args=(names,))
        try:
            self.score(prompt, response, vision)
        finally:
            outputs = self.llm.collective_rpc(_stop_probe)[0]
        return outputs

    def _wake(self) -> None:
        if self.asleep:  # GPU only (untested here)
            self.llm.wake_up()
            self.asleep = False
