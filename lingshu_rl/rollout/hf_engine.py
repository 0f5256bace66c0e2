"""Rollout engine on transformers ``generate`` (sampling with KV cache)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lingshu_rl.data.vision import VisionInputs, stack_vision
from lingshu_rl.rollout.protocol import Generation, SamplingParams


class TransformersRollout:
    def __init__(self, model_path: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", trust_remote_code: bool = False, max_batch: int = 64):
        self.tokenizer, self.device, self.max_batch = tokenizer, torch.device(device), max_batch
        from lingshu_rl.train.torch_engine import load_model  # a causal LM or a vision-language model

        self.model = load_model(model_path, dtype, trust_remote_code).to(self.device)
        self.model.eval()
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",) if t in tokenizer.get_vocab()}
                              | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

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
            max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            stop_strings=params.stop or None)
        input_ids = input_ids.to(self.device)
        sequences = self.model.generate(input_ids=input_ids, attention_mask=attention.to(self.device),
                                        generation_config=config, tokenizer=self.tokenizer if params.stop else None,
                                        **self._vision_kwargs(input_ids, visions))
        generations = []
        for prompt, row in zip(prompts, sequences[:, width:].tolist()):
            response, finish = [], "length"
            for token in row:
                response.append(token)
                if token in self.eos_ids:
                    finish = "stop"
                    break
            while finish == "length" and response and response[-1] == self.pad_id:  # padding after a stop string
                response.pop()
            text = self.tokenizer.decode(response, skip_special_tokens=True)
            if finish == "length" and params.stop and any(s in text for s in params.stop):
                finish = "stop"
            generations.append(Generation(list(prompt), response, text, finish))
        return generations

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        self.model.load_state_dict(weights, strict=True)
