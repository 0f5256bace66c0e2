"""A tiny Qwen2-architecture model and tokenizer built locally, for the offline demo.

:func:`build_tiny_model` writes an ordinary Hugging Face model directory (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` with a
Qwen-style chat template) that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
load with no network and no ``trust_remote_code``. The tokenizer is a byte-level BPE trained on the demo's
text (:func:`lingshu_rl.data.demo.demo_corpus`) with spaces split off as their own token, so that a drug
name is the same token in an option line ("A. metformin") and in the answer ("<answer>metformin</answer>"):
the model can then learn to copy one of the offered options, which makes the demo learnable in minutes
(with GPT-2-style space-prefixed words the warm-up took about twice as many steps and GRPO barely moved the
reward). The weights are a random init, deterministic from ``seed`` (the demo's warm-up SFT is done by the
training engine).

The directory is ``<cache>/tiny-qwen2-<hash>`` where ``<cache>`` is ``cache_dir``, else ``$LINGSHU_CACHE``,
else ``~/.cache/lingshu_rl``; the hash covers the demo text itself, the model/tokenizer settings, the
``tokenizers`` version (its BPE trainer's output has changed between releases) and the seed, so changing any
of them builds a new directory instead of silently reusing a stale one. It is built in a temporary directory next to it
and renamed into place, so concurrent builders and interrupted builds never leave a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lingshu_rl.cache import default_cache_dir
from lingshu_rl.data.demo import DEMO_VERSION, demo_corpus

TINY_VERSION = 2  # bump when this builder's output changes

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)

# Qwen-style ChatML template. Generation stops at <|im_end|> (the chat models' eos).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKENIZER_SETTINGS: dict[str, Any] = {"vocab_size": 1024, "min_frequency": 1}

# ~0.9M parameters with the demo vocabulary; GQA (4 query heads, 2 key/value heads) on purpose so that
# weight converters are exercised on grouped-query attention.
MODEL_SETTINGS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def tiny_model_hash(seed: int = 0) -> str:
    """The short hash naming the model directory for ``seed`` and the current settings."""
    import tokenizers

    corpus = hashlib.sha256("\n".join(demo_corpus()).encode()).hexdigest()
    key = json.dumps({"demo": DEMO_VERSION, "corpus": corpus, "tiny": TINY_VERSION, "tok": TOKENIZER_SETTINGS,
                      "tokenizers": tokenizers.__version__, "model": MODEL_SETTINGS, "template": CHAT_TEMPLATE,
                      "seed": seed}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def tiny_model_dir(cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    """Where :func:`build_tiny_model` puts (or finds) the model for these arguments."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"tiny-qwen2-{tiny_model_hash(seed)}"


def train_tiny_tokenizer():
    """A byte-level BPE trained on the demo text, as a ``PreTrainedTokenizerFast`` with the chat template,
    ``eos``/``pad`` = ``<|im_end|>``/``<|endoftext|>`` (as Qwen2 chat models). Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # a space is its own token, so words look the same after a space and after a tag (module docstring)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_SETTINGS["vocab_size"], min_frequency=TOKENIZER_SETTINGS["min_frequency"],
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    # the demo text plus the chat roles, so that the template's role names are whole tokens too
    corpus = [*demo_corpus(), *(f"{IM_START}{role}\n" for role in ("system", "user", "assistant"))]
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=EOS_TOKEN, bos_token=None, unk_token=None,
        model_max_length=MODEL_SETTINGS["max_position_embeddings"], padding_side="left",
        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_config(tokenizer, **overrides: Any):
    """The ``Qwen2Config`` for ``tokenizer``'s vocabulary (settings from :data:`MODEL_SETTINGS`)."""
    from transformers import Qwen2Config

    settings = {**MODEL_SETTINGS, **overrides}
    return Qwen2Config(
        vocab_size=len(tokenizer), bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        use_sliding_window=False, **settings)


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save ``tokenizer`` so that transformers 4.x and 5.x both load it, its chat template also inline."""
    tokenizer.save_pretrained(out)
    # name the generic fast class (transformers 5 writes its internal "TokenizersBackend"; 4.x lacks it)
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.setdefault("chat_template", tokenizer.chat_template)  # for readers that ignore the .jinja
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")


def _write_model(out: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = train_tiny_tokenizer()
    config = make_tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, config.pad_token_id], pad_token_id=config.pad_token_id,
        max_new_tokens=32)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    (out / "lingshu_tiny.json").write_text(json.dumps(
        {"seed": seed, "hash": tiny_model_hash(seed), "demo_version": DEMO_VERSION, "tiny_version": TINY_VERSION,
         "parameters": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")


def build_once(final: Path, write: Callable[[Path], None]) -> Path:
    """``final``, written by ``write(tmp)`` into a temporary directory next to it and renamed into place, unless
    a finished build is already there (marked by ``lingshu_tiny.json``)."""
    if (final / "lingshu_tiny.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, final)  # atomic; fails if another builder got there first
        except OSError:
            if not (final / "lingshu_tiny.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_model(cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    """Build (or reuse) the tiny demo model directory and return its path; see the module docstring."""
    return build_once(tiny_model_dir(cache_dir, seed), lambda tmp: _write_model(tmp, seed))
