"""Rollout engine on transformers ``generate`` (sampling with KV cache).

A response holds exactly the tokens the policy sampled: up to and including the first end-of-turn token, or up
to the token that completed a stop string, or all ``max_new_tokens``. ``generate`` fills the rows that finished
early with the pad id, which may itself be an end-of-turn id (Qwen2.5 base models; Llama without a pad token);
those fillers are never read as a sampled token. Stop strings match only inside the generated text, never
across the end of the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteriaList, StopStringCriteria

from lingshu_rl.data.vision import VisionInputs, stack_vision
from lingshu_rl.models.hf import placeholder_token_ids
from lingshu_rl.models.probe import capture
from lingshu_rl.rollout.protocol import Generation, SamplingParams


class GeneratedStopStrings(StopStringCriteria):
    """transformers' stop-string matching on the generated tokens only (``generate`` passes the whole sequence,
    so a stop string could otherwise start in the prompt), remembering where each row stopped.

    ``stopped_at[i]`` is the number of generated tokens when row i first matched, -1 if it never did; kept on the
    device (no synchronisation per decoding step).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: list[str], prompt_width: int):
        super().__init__(tokenizer, stop_strings)
        self.prompt_width = prompt_width
        self.stopped_at: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        generated = input_ids[:, self.prompt_width:]  # left padding: every row's generation starts here
        hit = super().__call__(generated, scores)
        if self.stopped_at is None:
            self.stopped_at = torch.full(hit.shape, -1, dtype=torch.long, device=hit.device)
        first = hit & (self.stopped_at < 0)
        self.stopped_at = torch.where(first, generated.shape[1], self.stopped_at)
        return hit


class TransformersRollout:
    def __init__(self, model_path: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", trust_remote_code: bool = False, max_batch: int = 64):
        self.tokenizer, self.device, self.max_batch = tokenizer, torch.device(device), max_batch
        from lingshu_rl.models.hf import load_model  # a causal LM or a vision-language model
        from lingshu_rl.rollout.vllm_engine import end_of_turn_ids  # the same stop tokens in both engines

        self.model = load_model(model_path, dtype, trust_remote_code, self.device)
        self.model.eval()
        self.eos_ids = end_of_turn_ids(tokenizer)
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.banned = placeholder_token_ids(self.model.config)  # image/video placeholders: never sampled

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[VisionInputs | None] | None = None) -> list[Generation]:
        expanded = [p for p in prompts for _ in range(params.n)]  # [B*n], grouped by prompt
        visions = [v for v in (images or [None] * len(prompts)) for _ in range(params.n)]
        torch.manual_seed(params.seed)
        out: list[Generation] = []
        for start in range(0, len(expanded), self.max_batch):
            end = start + self.max_batch
            out.extend(self._generate_chunk(expanded[start:end], params, visions[start:end]))
        return out

    def _vision_kwargs(self, input_ids: Tensor, visions: list[VisionInputs | None]) -> dict[str, Tensor]:
        stacked = stack_vision(visions)
        if stacked is None:
            return {}
        pixel_values, image_grid_thw, _ = stacked
        # mm_token_type_ids (1 on image tokens) makes generate build the 3-D rotary positions of the images
        return {"pixel_values": pixel_values.to(self.device, self.model.dtype),
                "image_grid_thw": image_grid_thw.to(self.device),
                "mm_token_type_ids": (input_ids == self.model.config.image_token_id).long()}

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams,
                        visions: list[VisionInputs | None]) -> list[Generation]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            attention[i, width - len(prompt):] = 1
        greedy = params.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p, top_k=(params.top_k or None) if not greedy else None,
            max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens or None,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            suppress_tokens=self.banned or None)
        stop = GeneratedStopStrings(self.tokenizer, params.stop, width) if params.stop else None
        input_ids = input_ids.to(self.device)
        model: Any = self.model  # generate's typed self (GenerativePreTrainedModel) is not what loading declares
        sequences = model.generate(input_ids=input_ids, attention_mask=attention.to(self.device),
                                   generation_config=config,
                                   stopping_criteria=StoppingCriteriaList([stop] if stop else []),
                                   **self._vision_kwargs(input_ids, visions))
        rows = sequences[:, width:].tolist()
        stopped_at = stop.stopped_at.tolist() if stop is not None and stop.stopped_at is not None else [-1] * len(rows)
        generations = []
        for prompt, row, stop_end in zip(prompts, rows, stopped_at):
            # the sampled tokens end at the first end-of-turn token or where a stop string was completed,
            # whichever came first; what follows is generate's padding, even when the pad id is an eos id
            end, finish = len(row), "length"
            eos_at = next((k for k, token in enumerate(row) if token in self.eos_ids), None)
            if eos_at is not None:
                end, finish = eos_at + 1, "stop"
            if 0 < stop_end <= end:
                end, finish = stop_end, "stop"
            response = row[:end]
            text = cast(str, self.tokenizer.decode(response, skip_special_tokens=True))
            generations.append(Generation(list(prompt), response, text, finish))
        return generations

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        """Copy each tensor into the parameter (or buffer) of its name; every parameter must be given (tied ones
        once, or under each name)."""
        state = self.model.state_dict(keep_vars=True)
        written: set[int] = set()
        for name, tensor in weights.items() if isinstance(weights, Mapping) else weights:
            if name not in state:
                raise KeyError(f"load_weights: the rollout model has no tensor {name!r}")
            state[name].copy_(tensor)
            written.add(id(state[name]))
        if missing := [n for n, p in self.model.named_parameters() if id(p) not in written]:
            raise KeyError(f"load_weights: {len(missing)} parameter(s) were not given, e.g. {missing[0]!r}")

    @torch.no_grad()
    def score(self, prompt: list[int], response: list[int], vision: VisionInputs | None = None) -> list[float]:
        input_ids = torch.tensor([prompt + response], device=self.device)
        logits = self.model(input_ids=input_ids, **self._vision_kwargs(input_ids, [vision])).logits[0].float()
        steps = logits[len(prompt) - 1:-1].log_softmax(dim=-1)  # position t predicts token t + 1
        return steps.gather(-1, torch.tensor(response, device=self.device).unsqueeze(-1)).squeeze(-1).tolist()

    @torch.no_grad()
    def probe(self, prompt: list[int], response: list[int], vision: VisionInputs | None,
              modules: list[str]) -> dict[str, Tensor]:
        """Each of ``modules``' output while scoring the response (:mod:`lingshu_rl.models.probe`)."""
        with capture(self.model, {m: m for m in modules}) as outputs:
            self.score(prompt, response, vision)
        return dict(outputs)
