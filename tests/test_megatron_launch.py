"""The launcher end to end with ``train.engine=megatron``, TP=2 and DP=2, against the transformers engine (same
seed).

The SFT warm-up runs once (torch engine) and both runs start GRPO from it, so step 1 samples the same responses;
with megatron the actor and the reference are each a group of two rank actors. The step-1 ``actor/logprob_mean``
(log-probs of the same responses under the same policy, computed by two engines) must agree within 1e-4.
(Warming up separately on each engine lets float noise flip a sampled token, and then the batches differ.)
"""

import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_spec("megatron") is None or find_spec("megatron.core") is None,
                                 reason="megatron-core is not installed (pip install -e '.[megatron]')")]

SMALL = ["grpo.steps=2", "sft.stages.0.steps=20", "rollout.n=4", "grpo.prompts_per_step=4",
         "rollout.engine=transformers", "cluster.include_dashboard=false", "logging.wandb.mode=disabled"]


def launch(output_dir: Path, stages: str, *extra: str, env: dict | None = None) -> list[dict]:
    args = [sys.executable, "-m", "lingshu_rl.launch", "--reward", "mcq_exact", "--output-dir", str(output_dir),
            "--stages", stages]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    env = {**os.environ, "LINGSHU_CACHE": str(output_dir.parent / "cache"), **(env or {})}
    proc = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    metrics = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []


def test_megatron_tp2_and_dp2_match_torch_engine_at_step_1(tmp_path: Path) -> None:
    launch(tmp_path / "torch", "sft")
    shutil.copytree(tmp_path / "torch" / "sft", tmp_path / "megatron" / "sft")
    torch_rows = launch(tmp_path / "torch", "grpo")
    megatron_rows = launch(tmp_path / "megatron", "grpo", "train.engine=megatron", "train.tensor_parallel_size=2")
    assert [r["step"] for r in megatron_rows] == [1, 2]
    assert megatron_rows[0]["actor/logprob_mean"] == pytest.approx(torch_rows[0]["actor/logprob_mean"], abs=1e-4)
    shutil.copytree(tmp_path / "torch" / "sft", tmp_path / "megatron-dp" / "sft")
    dp_rows = launch(tmp_path / "megatron-dp", "grpo", "train.engine=megatron", "train.data_parallel_size=2")
    assert dp_rows[0]["actor/logprob_mean"] == pytest.approx(torch_rows[0]["actor/logprob_mean"], abs=1e-4)
    checkpoint = tmp_path / "megatron" / "checkpoints" / "step_000002"
    assert (checkpoint / "megatron" / "optimizer_tp0.pt").is_file()
    assert (checkpoint / "megatron" / "optimizer_tp1.pt").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoint / "model")  # a plain Hugging Face model


def hub_cache(root: Path, repo: str, model: Path) -> Path:
    """A Hugging Face cache holding ``model`` as the hub repository ``repo`` (the layout the hub client writes)."""
    revision = "0" * 40
    snapshot = root / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    shutil.copytree(model, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)
    return root


def test_hub_id_from_the_cache_offline_in_both_engines(tmp_path: Path) -> None:
    """``model.path`` as a hub id: the megatron engine reads the same cached snapshot as the torch engine (offline,
    as from_pretrained does), so step 1 scores the same responses the same way."""
    from lingshu_rl.models.tiny import build_tiny_model

    cache = hub_cache(tmp_path / "hub", "lingshu-test/tiny-qwen2", build_tiny_model(tmp_path / "built"))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    sets = ["model.path=lingshu-test/tiny-qwen2", "sft.stages=[]", "grpo.steps=1"]
    torch_rows = launch(tmp_path / "torch", "grpo", *sets, env=env)
    megatron_rows = launch(tmp_path / "megatron", "grpo", *sets, "train.engine=megatron", env=env)
    assert megatron_rows[0]["actor/logprob_mean"] == pytest.approx(torch_rows[0]["actor/logprob_mean"], abs=1e-4)
