"""Correctness of the GRPO data path on the real tiny model (real transformers generation, real engines):

- the transformers rollout keeps exactly the sampled tokens when the pad id is also an end-of-sequence id;
- stop strings match only inside the generated text, never across the end of the prompt;
- old/reference log-prob passes run with dropout off (torch and megatron engines) and restore the mode.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from lingshu_rl.rollout.protocol import SamplingParams


def demo_prompts(path: str, count: int = 4, pad_token: str | None = None) -> tuple[list[list[int]], object]:
    from transformers import AutoTokenizer

    from lingshu_rl.data.chat import encode_prompt
    from lingshu_rl.data.demo import make_demo_dataset

    tokenizer = AutoTokenizer.from_pretrained(path)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return [encode_prompt(tokenizer, s) for s in make_demo_dataset(seed=0)[0][:count]], tokenizer


def rollout(path: str, tokenizer):
    from lingshu_rl.rollout.hf_engine import TransformersRollout

    return TransformersRollout(path, tokenizer)


# ---- 1. unsampled end-of-sequence tokens ------------------------------------------------------------------------

def test_pad_that_is_eos_never_enters_a_response(tiny: str) -> None:
    """Qwen2.5 base / Llama without a pad token: pad id == eos id. Rows stopped by a stop string are followed by
    padding in ``generate``'s output; that padding must not be read as a sampled EOS."""
    prompts, plain = demo_prompts(tiny)
    _, eos_padded = demo_prompts(tiny, pad_token="<|im_end|>")
    eos = eos_padded.convert_tokens_to_ids("<|im_end|>")
    assert eos_padded.pad_token_id == eos == eos_padded.eos_token_id
    assert plain.pad_token_id != eos
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=12, stop=["e"], seed=3)

    reference = rollout(tiny, plain).generate(prompts, params)  # the same sampling, padding that is no eos
    longest = max(len(g.response_ids) for g in reference)
    assert any(g.finish_reason == "stop" and len(g.response_ids) < longest for g in reference), \
        "no row stopped while others went on: nothing was padded"

    gens = rollout(tiny, eos_padded).generate(prompts, params)
    for g in gens:
        ids = g.response_ids
        assert eos not in ids[:-1], ids  # at most one EOS, and only as the last token
        if g.finish_reason == "stop" and ids[-1] != eos:  # stopped on the token that completed "e"
            assert "e" in g.text and "e" not in eos_padded.decode(ids[:-1]), (ids, g.text)
        if g.finish_reason == "stop" and ids[-1] == eos:  # a sampled EOS: the text must not have stopped before
            assert "e" not in g.text, (ids, g.text)
        if g.finish_reason == "length":
            assert len(ids) == params.max_new_tokens
    assert [g.response_ids for g in gens] == [g.response_ids for g in reference]
    assert [g.finish_reason for g in gens] == [g.finish_reason for g in reference]


# ---- 5. stop strings only inside the generated text -------------------------------------------------------------

def test_stop_string_does_not_match_across_the_prompt(tiny: str) -> None:
    prompts, tokenizer = demo_prompts(tiny, 2)
    engine = rollout(tiny, tokenizer)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    free = engine.generate(prompts, greedy)
    # the prompt's last characters followed by the response's first one: present in prompt + response, absent
    # from every response on its own
    tail = tokenizer.decode(prompts[0])[-4:]
    stop = tail + free[0].text[:1]
    assert all(tokenizer.decode(p).endswith(tail) for p in prompts)
    assert all(stop not in g.text and g.text.startswith(free[0].text[:1]) for g in free), stop

    crossing = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=16, stop=[stop]))
    assert [(g.response_ids, g.finish_reason) for g in crossing] == [(g.response_ids, g.finish_reason) for g in free]

    # a stop string inside the response still stops right where it is completed
    inside = free[0].text[:2]
    stopped = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=16, stop=[inside]))
    for g, f in zip(stopped, free):
        assert g.finish_reason == "stop" and g.text.endswith(inside) and inside not in g.text[:-1]
        assert g.response_ids == f.response_ids[:len(g.response_ids)]


# ---- 4. old / reference log-probs with dropout off --------------------------------------------------------------

def with_dropout(tiny: str, out: Path, rate: float = 0.5) -> str:
    """The tiny model with attention dropout (as some checkpoints ship), in a new directory."""
    import shutil

    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config["attention_dropout"] = rate
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def random_batch(vocab: int, rows: int = 4):
    from lingshu_rl.train.batch import collate

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (5 + i,), generator=gen).tolist() for i in range(rows)]
    responses = [torch.randint(3, vocab, (7 - i,), generator=gen).tolist() for i in range(rows)]
    return collate(prompts, responses, pad_id=0)


def test_torch_engine_logprobs_run_without_dropout(tiny: str, tmp_path: Path) -> None:
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.train.torch_engine import TorchEngine

    path = with_dropout(tiny, tmp_path / "dropout")
    actor = TorchEngine(path, ModelConfig(), TrainConfig(micro_batch_size=2, device="cpu"))
    batch = random_batch(actor.lm.config.vocab_size)
    assert actor.model.training
    with torch.no_grad():  # the precondition: in training mode this model's forward is random
        assert not torch.equal(actor.forward(batch, 1.0, False)[0], actor.forward(batch, 1.0, False)[0])

    first, second = actor.logprobs(batch, 0.7), actor.logprobs(batch, 0.7)
    assert torch.equal(first, second), (first - second).abs().max()
    assert actor.model.training  # the update that follows still trains with dropout
    frozen = TorchEngine(path, ModelConfig(), TrainConfig(micro_batch_size=4, device="cpu"), trainable=False)
    assert torch.allclose(first, frozen.logprobs(batch, 0.7), atol=1e-6)  # the reference policy: the same values
    assert not frozen.model.training


MEGATRON_LOGPROBS = """
import json, sys
import torch
from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.train.megatron.engine import MegatronEngine
sys.path.insert(0, sys.argv[3])
from test_correctness import random_batch

engine = MegatronEngine(sys.argv[1], ModelConfig(), TrainConfig(engine="megatron", micro_batch_size=2, device="cpu"),
                        master_port=int(sys.argv[2]))
batch = random_batch(engine.spec.vocab_size)
with torch.no_grad():
    train_mode_diff = (engine._logits(batch) - engine._logits(batch)).abs().max().item()
first, second = engine.logprobs(batch, 0.7), engine.logprobs(batch, 0.7)
print(json.dumps({"train_mode_diff": train_mode_diff, "logprobs_diff": (first - second).abs().max().item(),
                  "training_after": engine.model.training}))
"""


@pytest.mark.skipif(find_spec("megatron") is None or find_spec("megatron.core") is None,
                    reason="megatron-core is not installed (pip install -e '.[megatron]')")
def test_megatron_engine_logprobs_run_without_dropout(tiny: str, tmp_path: Path) -> None:
    path = with_dropout(tiny, tmp_path / "dropout")
    with socket.socket() as sock:  # its own process: the engine initialises torch.distributed (gloo, one rank)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", MEGATRON_LOGPROBS, path, str(port), str(Path(__file__).parent)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["train_mode_diff"] > 0  # the precondition: dropout is active in training mode
    assert result["logprobs_diff"] == 0.0
    assert result["training_after"] is True
