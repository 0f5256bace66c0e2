"""A tiny Qwen2.5-VL-architecture model (vision tower + text model) built locally, for the multimodal path.

:func:`build_tiny_vl_model` writes an ordinary Hugging Face directory, as Lingshu (a Qwen2.5-VL) has one:
``config.json`` (``Qwen2_5_VLForConditionalGeneration``), ``model.safetensors``, ``generation_config.json``,
the tokenizer files with a Qwen2-VL-style chat template, ``preprocessor_config.json`` (the image processor)
and ``processor_config.json`` (``Qwen2_5_VLProcessor``). ``AutoModelForImageTextToText.from_pretrained``,
``AutoTokenizer`` and ``AutoImageProcessor`` load it with no network and no ``trust_remote_code``.

The tokenizer is :func:`lingshu_rl.models.tiny.train_tiny_tokenizer` (the demo's byte-level BPE) plus
Qwen2-VL's vision tokens; the text model has the settings of :data:`lingshu_rl.models.tiny.MODEL_SETTINGS`
with multimodal RoPE (``mrope_section`` [4, 6, 6]: the 16 rotary frequencies of a 32-wide head split over
time/height/width as Qwen's [16, 24, 24] does for 128). The vision tower is two blocks of width 32 (the
second with full attention, the first windowed, so both of Qwen2.5-VL's attention kinds run), and the image
processor resizes every image to between 56x56 and 112x112 pixels: 4 to 16 image tokens after the 2x2 merge.

Without torchvision (the CPU machines here: its PyPI wheel is a CUDA build that breaks the CPU torch),
``AutoProcessor.from_pretrained`` fails for every Qwen2-VL-family directory, because transformers always
builds the video processor, which needs torchvision (huggingface/transformers#48558), and vLLM's Qwen2-VL /
Qwen2.5-VL model modules do not even import (they import ``smart_resize`` from transformers' torchvision
image processor module). :func:`enable_qwen_vl_without_torchvision` patches both, in this process, for
images only; with torchvision installed it does nothing.

The directory is ``<cache>/tiny-qwen2_5_vl-<hash>`` (cache as in :mod:`lingshu_rl.models.tiny`); the hash
covers the text model's hash (demo text, tokenizer and text settings, seed) and every setting here. It is
built in a temporary directory and renamed into place, as the text model is.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

from lingshu_rl.cache import default_cache_dir
from lingshu_rl.models.tiny import (
    EOS_TOKEN,
    IM_END,
    MODEL_SETTINGS,
    build_once,
    save_tokenizer,
    tiny_model_hash,
    train_tiny_tokenizer,
)

TINY_VL_VERSION = 1  # bump when this builder's output changes

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Qwen2-VL's vision tokens, in Qwen's order (<|vision_pad|> is unused by the model but part of the family's
# vocabulary, so prompts written for Qwen tokenize the same way)
VISION_TOKENS = (VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD)

# Qwen2-VL's chat template without its default system prompt (as the text model's template has none): a
# message's content is a string, or a list of {"type": "image"} / {"type": "video"} / {"type": "text", ...}
# items; an image becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor (or vLLM) expands
# to one <|image_pad|> per image token. String content renders exactly as in the text model's template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2.5-VL text settings on top of the text model's: 3-D rotary positions for image tokens
TEXT_SETTINGS: dict[str, Any] = {
    **{k: v for k, v in MODEL_SETTINGS.items() if k not in ("rope_theta", "tie_word_embeddings")},
    "rope_parameters": {"rope_type": "default", "rope_theta": MODEL_SETTINGS["rope_theta"],
                        "mrope_section": [4, 6, 6]},
}

VISION_SETTINGS: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 56,  # pixels: 2x2 merged tokens per window, so a 112x112 image has 4 windows
    "fullatt_block_indexes": [1],
    "out_hidden_size": MODEL_SETTINGS["hidden_size"],
    "hidden_act": "silu",
    "initializer_range": MODEL_SETTINGS["initializer_range"],
}

MIN_PIXELS = 56 * 56  # 4x4 patches -> 4 image tokens
MAX_PIXELS = 112 * 112  # 8x8 patches -> 16 image tokens


def tiny_vl_model_hash(seed: int = 0) -> str:
    """The short hash naming the model directory for ``seed`` and the current settings."""
    key = json.dumps({"text": tiny_model_hash(seed), "tiny_vl": TINY_VL_VERSION, "tokens": VISION_TOKENS,
                      "template": CHAT_TEMPLATE, "text_settings": TEXT_SETTINGS, "vision": VISION_SETTINGS,
                      "pixels": [MIN_PIXELS, MAX_PIXELS]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def tiny_vl_model_dir(cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    """Where :func:`build_tiny_vl_model` puts (or finds) the model for these arguments."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"tiny-qwen2_5_vl-{tiny_vl_model_hash(seed)}"


def train_tiny_vl_tokenizer():
    """The text model's tokenizer plus Qwen2-VL's vision tokens (special: decoding skips them) and
    :data:`CHAT_TEMPLATE`. Deterministic."""
    tokenizer = train_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_image_processor():
    """Qwen2-VL's image processor (the PIL/numpy one: no torchvision) with this model's small image sizes."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=VISION_SETTINGS["patch_size"],
        temporal_patch_size=VISION_SETTINGS["temporal_patch_size"], merge_size=VISION_SETTINGS["spatial_merge_size"])


def make_tiny_vl_config(tokenizer):
    """The ``Qwen2_5_VLConfig`` for ``tokenizer``'s vocabulary."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={**TEXT_SETTINGS, "vocab_size": len(tokenizer), "bos_token_id": None,
                     "eos_token_id": ids(IM_END), "pad_token_id": ids(EOS_TOKEN), "use_sliding_window": False},
        vision_config=VISION_SETTINGS, tie_word_embeddings=MODEL_SETTINGS["tie_word_embeddings"],
        image_token_id=ids(IMAGE_PAD), video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END))


def _write_model(out: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = train_tiny_vl_tokenizer()
    config = make_tiny_vl_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    eos, pad = config.text_config.eos_token_id, config.text_config.pad_token_id
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, max_new_tokens=32)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    # The processor's files are written directly: without torchvision a Qwen2_5_VLProcessor cannot be
    # constructed to save itself (module docstring). min/max_pixels are also written under their old names,
    # which transformers 4.x reads.
    image_processor = make_tiny_image_processor()
    image_processor.save_pretrained(out)
    pre_config_path = out / "preprocessor_config.json"
    pre_config = json.loads(pre_config_path.read_text())
    pre_config.update(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, processor_class="Qwen2_5_VLProcessor")
    pre_config_path.write_text(json.dumps(pre_config, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")
    (out / "lingshu_tiny.json").write_text(json.dumps(
        {"seed": seed, "hash": tiny_vl_model_hash(seed), "architecture": "Qwen2_5_VLForConditionalGeneration",
         "tiny_vl_version": TINY_VL_VERSION, "parameters": sum(p.numel() for p in model.parameters())},
        indent=2) + "\n")


def build_tiny_vl_model(cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    """Build (or reuse) the tiny vision-language model directory and return its path; see the module docstring."""
    return build_once(tiny_vl_model_dir(cache_dir, seed), lambda tmp: _write_model(tmp, seed))


@functools.cache
def _no_video_processor_class() -> type:
    """The stand-in for a Qwen2-VL processor's video processor when torchvision is missing: it loads, serialises
    to nothing and refuses videos. Built on first use (it subclasses transformers' PushToHubMixin, which is
    what ``ProcessorMixin.to_dict`` serialises through, and that import costs seconds)."""
    from transformers.processing_utils import VideosKwargs
    from transformers.utils import PushToHubMixin

    class NoVideoProcessor(PushToHubMixin):
        valid_kwargs = VideosKwargs  # vLLM reads the accepted video kwargs' names off the video processor
        _auto_class = None  # read by ProcessorMixin.save_pretrained: no custom code to save

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> NoVideoProcessor:
            return cls()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("videos need torchvision, which is not installed")

        def to_dict(self) -> dict[str, Any]:
            return {}

    NoVideoProcessor.__module__ = __name__
    return NoVideoProcessor


def __getattr__(name: str) -> Any:
    if name == "NoVideoProcessor":  # how transformers' patched video-processor lookup finds it (below)
        return _no_video_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable_qwen_vl_without_torchvision(vllm: bool = False) -> bool:
    """Let Qwen2-VL-family processors (``AutoProcessor``) and, with ``vllm``, vLLM's Qwen2-VL / Qwen2.5-VL models
    load without torchvision, for images. Returns whether it patched (False when torchvision is importable).

    Process-wide and idempotent. It changes only what would otherwise raise: (1) a processor's video processor
    becomes a ``NoVideoProcessor``, which refuses videos; (2) with ``vllm``, transformers' torchvision
    image-processor module is replaced by a stub holding the one function vLLM imports from it
    (``smart_resize``, the same code as in the PIL module), and vLLM's two model classes are registered as
    loaded classes, because vLLM otherwise imports them in a fresh subprocess to inspect them, where this
    patch does not exist. For the same reason the vLLM engine must run in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which the rollout engine sets).
    """
    if importlib.util.find_spec("torchvision") is not None:
        return False
    from transformers import processing_utils

    no_video = _no_video_processor_class()
    auto = processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING  # modality -> (module, class) of its Auto class
    auto._MAPPING_NAMES = {**auto._MAPPING_NAMES, "video_processor": (__name__, "NoVideoProcessor")}
    check = processing_utils.ProcessorMixin.check_argument_for_proper_class
    if not getattr(check, "_lingshu_no_video", False):
        def check_argument(self: Any, argument_name: str, argument: Any) -> Any:
            # the real check cannot even resolve the video processor base class without torchvision
            if argument_name == "video_processor" and isinstance(argument, no_video):
                return no_video
            return check(self, argument_name, argument)

        check_argument.__dict__["_lingshu_no_video"] = True  # marks the installed patch
        # a monkeypatch of transformers' method, which mypy does not allow to be assigned
        processing_utils.ProcessorMixin.check_argument_for_proper_class = check_argument  # type: ignore[method-assign]
    if vllm:
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl

        stub = types.ModuleType("transformers.models.qwen2_vl.image_processing_qwen2_vl")
        stub.__dict__["smart_resize"] = image_processing_pil_qwen2_vl.smart_resize
        sys.modules.setdefault(stub.__name__, stub)
        from vllm import ModelRegistry
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
        from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

        for cls in (Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration):
            ModelRegistry.register_model(cls.__name__, cls)
    return True
