"""The built-in demo: generated data, the locally trained tokenizer and the tiny model directory."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lingshu_rl.data.demo import (DEMO_SOURCE, FACTS, HELDOUT_TEMPLATES, LETTERS, SYSTEM_PROMPT, TRAIN_TEMPLATES,
                                  demo_score, demo_sft_sample, demo_target, make_demo_dataset)
from lingshu_rl.data.sample import Sample


@pytest.fixture(scope="module")
def splits():
    return make_demo_dataset(n_train=400, n_heldout=100, seed=0)


def _user(sample: Sample) -> str:
    return sample.messages[-1]["content"]


def test_fact_table_is_usable():
    conditions = [c for c, _ in FACTS]
    drugs = [d for _, d in FACTS]
    assert 16 <= len(FACTS) <= 24
    assert len(set(conditions)) == len(conditions) and len(set(drugs)) == len(drugs)


def test_dataset_is_deterministic_and_seeded(splits):
    again = make_demo_dataset(n_train=400, n_heldout=100, seed=0)
    assert [s.to_dict() for s in splits[0] + splits[1]] == [s.to_dict() for s in again[0] + again[1]]
    other = make_demo_dataset(n_train=400, n_heldout=100, seed=1)
    assert [s.to_dict() for s in splits[0]] != [s.to_dict() for s in other[0]]
    train, heldout = make_demo_dataset()
    assert (len(train), len(heldout)) == (2000, 200)
    assert make_demo_dataset(n_train=0, n_heldout=0) == ([], [])


def test_ids_and_fields(splits):
    train, heldout = splits
    assert [s.id for s in train] == [f"demo-train-{i}" for i in range(400)]
    assert [s.id for s in heldout] == [f"demo-heldout-{i}" for i in range(100)]
    for s in train + heldout:
        assert s.task == "mcq" and s.source == DEMO_SOURCE and s.images == []
        assert [m["role"] for m in s.messages] == ["system", "user"]
        assert s.messages[0]["content"] == SYSTEM_PROMPT
        assert s.reward_fields()["data_source"] == DEMO_SOURCE


def test_every_sample_is_a_valid_question(splits):
    train, heldout = splits
    drugs = {d for _, d in FACTS}
    for s in train + heldout:
        assert list(s.options) == list(LETTERS)
        assert len(set(s.options.values())) == 4 and set(s.options.values()) <= drugs
        assert s.answer in s.options
        condition, gold = FACTS[s.meta["fact"]]
        assert s.options[s.answer] == gold and s.meta["condition"] == condition
        lines = _user(s).split("\n")
        assert condition in lines[0]
        assert lines[1:] == [f"{k}. {v}" for k, v in s.options.items()]


def test_splits_are_balanced_and_heldout_is_not_a_copy(splits):
    train, heldout = splits
    fact_counts = Counter(s.meta["fact"] for s in train)
    assert len(fact_counts) == len(FACTS) and max(fact_counts.values()) - min(fact_counts.values()) <= 1
    letters = Counter(s.answer for s in train)
    assert set(letters) == set(LETTERS) and min(letters.values()) > 0.15 * len(train)
    train_first_lines = {t.format(condition=c) for t in TRAIN_TEMPLATES for c, _ in FACTS}
    heldout_first_lines = {t.format(condition=c) for t in HELDOUT_TEMPLATES for c, _ in FACTS}
    assert not train_first_lines & heldout_first_lines
    assert {_user(s).split("\n")[0] for s in train} == train_first_lines
    assert {_user(s).split("\n")[0] for s in heldout} <= train_first_lines
    train_sets = {(s.meta["fact"], frozenset(s.options.values())) for s in train}
    assert not any((s.meta["fact"], frozenset(s.options.values())) in train_sets for s in heldout)
    assert not {_user(s) for s in train} & {_user(s) for s in heldout}
    assert {s.meta["fact"] for s in heldout} == set(range(len(FACTS)))  # same facts, new questions

    para_train, para = make_demo_dataset(n_train=400, n_heldout=100, seed=0, paraphrased_heldout=True)
    assert [s.to_dict() for s in para_train] == [s.to_dict() for s in train]
    assert {_user(s).split("\n")[0] for s in para} <= heldout_first_lines
    assert not any((s.meta["fact"], frozenset(s.options.values())) in train_sets for s in para)


def test_target_and_reference_score(splits):
    s = splits[0][0]
    gold = s.options[s.answer]
    assert demo_target(s) == f"<answer>{gold}</answer>"
    assert demo_score(demo_target(s), s) == 1.0
    assert demo_score(f"<answer> {gold.upper()} </answer>", s) == 1.0
    wrong = next(v for k, v in s.options.items() if k != s.answer)
    assert demo_score(f"<answer>{wrong}</answer>", s) == 0.0
    assert demo_score(gold, s) == 0.0  # no tags, no credit
    assert demo_score(f"<answer>{wrong}</answer> <answer>{gold}</answer>", s) == 1.0  # the last tag counts
    assert demo_score(f"<answer>{gold}</answer>garbage</answer>", s) == 1.0
    sft = demo_sft_sample(s)
    assert sft.messages[-1] == {"role": "assistant", "content": demo_target(s)} and len(s.messages) == 2


def test_mcq_exact_credits_the_demo_answer_format(splits):
    from lingshu_rl.rewards.mcq import mcq_exact

    for s in splits[0][:40] + splits[1][:40]:
        wrong = next(v for k, v in s.options.items() if k != s.answer)
        for response in (demo_target(s), f"<answer>{wrong}</answer>", "<answer></answer>", s.options[s.answer][:3]):
            assert float(mcq_exact(response, s.answer, options=s.options)["score"]) == demo_score(response, s)


# --------------------------------------------------------------------------- tokenizer and model

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lingshu_rl.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("cache"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def test_tokenizer_round_trip_and_special_tokens(tokenizer, splits):
    from lingshu_rl.models.tiny import SPECIAL_TOKENS

    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for s in splits[0][:50] + splits[1][:50]:
        for text in (_user(s), demo_target(s), "Ünïcode 药物 ☤ not in the corpus"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
    # the demo's words are whole tokens: prompts stay short
    assert len(tokenizer(demo_target(splits[0][0]), add_special_tokens=False)["input_ids"]) <= 10


def test_chat_template(tokenizer, splits):
    s = splits[0][0]
    text = tokenizer.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{_user(s)}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    full = tokenizer.apply_chat_template(demo_sft_sample(s).messages, tokenize=False)
    assert full == text.removesuffix("<|im_start|>assistant\n") + \
        f"<|im_start|>assistant\n{demo_target(s)}<|im_end|>\n"
    ids = tokenizer.apply_chat_template(s.messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids) == text


def test_model_dir_loads_offline_and_generates(model_dir, tokenizer, splits, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from lingshu_rl.models.tiny import MODEL_SETTINGS, build_tiny_model, tiny_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == len(tokenizer)
    assert config["hidden_size"] == MODEL_SETTINGS["hidden_size"]

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template([s.messages for s in splits[0][:3]], add_generation_prompt=True,
                                          padding=True, return_tensors="pt", return_dict=True, tokenize=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=5)
    assert out.shape[0] == 3 and 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 5

    # reused when present (no rebuild), and the path is keyed by the seed
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(model_dir.parent, seed=0) == model_dir == tiny_model_dir(model_dir.parent, seed=0)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny_model_dir(model_dir.parent, seed=1) != model_dir


def test_cache_dir_default_from_env(tmp_path, monkeypatch):
    from lingshu_rl.models.tiny import tiny_model_dir

    monkeypatch.setenv("LINGSHU_CACHE", str(tmp_path))
    assert tiny_model_dir().parent == tmp_path and tiny_model_dir().name.startswith("tiny-qwen2-")
    monkeypatch.delenv("LINGSHU_CACHE")
    assert tiny_model_dir().parent.name == "lingshu_rl"


def test_init_is_deterministic_from_seed(model_dir, tmp_path):
    from safetensors.torch import load_file

    from lingshu_rl.models.tiny import build_tiny_model

    again = build_tiny_model(tmp_path, seed=0)
    assert again.name == model_dir.name
    a, b = load_file(model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
