"""The launcher end to end with ``train.engine=megatron``, TP=2, against the transformers engine (same seed).

Both runs do the SFT warm-up and two GRPO steps on a local Ray cluster; with megatron the actor, the reference
and the SFT worker are each a group of two rank actors. The policies are the same up to float noise, so the
step-1 ``actor/logprob_mean`` (log-probs of the same sampled responses) must agree within 1e-4.
"""

import json
import os
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


def launch(output_dir: Path, *extra: str) -> list[dict]:
    args = [sys.executable, "-m", "lingshu_rl.launch", "--reward", "mcq_exact", "--output-dir", str(output_dir),
            "--stages", "sft,grpo"]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    env = {**os.environ, "LINGSHU_CACHE": str(output_dir.parent / "cache")}
    proc = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_megatron_tp2_matches_torch_engine_at_step_1(tmp_path: Path) -> None:
    torch_rows = launch(tmp_path / "torch")
    megatron_rows = launch(tmp_path / "megatron", "train.engine=megatron", "train.tensor_parallel_size=2")
    assert [r["step"] for r in megatron_rows] == [1, 2]
    assert megatron_rows[0]["actor/logprob_mean"] == pytest.approx(torch_rows[0]["actor/logprob_mean"], abs=1e-4)
    checkpoint = tmp_path / "megatron" / "checkpoints" / "step_000002"
    assert (checkpoint / "megatron" / "optimizer_tp0.pt").is_file()
    assert (checkpoint / "megatron" / "optimizer_tp1.pt").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoint / "model")  # a plain Hugging Face model
