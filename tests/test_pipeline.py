"""The staged recipe through the launcher: SFT stages with frozen modules, resume inside stage 2 after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).parents[1] / "examples" / "recipes" / "cpu_small.yaml"
SMALL_SFT = ["sft.stages.0.steps=6", "sft.stages.0.batch_size=16", "sft.stages.1.steps=12",
             "sft.stages.1.batch_size=16", "sft.stages.1.checkpoint_every=4", "cluster.include_dashboard=false"]


def launch(output_dir: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "lingshu_rl.launch", "--config", str(RECIPE), "--output-dir", str(output_dir)]
    for item in SMALL_SFT:
        args += ["--set", item]
    return subprocess.Popen([*args, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LINGSHU_CACHE": str(output_dir.parent / "cache")})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sft_stages_freeze_and_resume_inside_stage_two(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = launch(out, "--stages", "sft")
    deadline = time.time() + 600
    while not (out / "sft" / "deep" / "checkpoints" / "step_000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "sft" / "deep" / "done.json").exists()

    refused = launch(out, "--stages", "sft")
    text, _ = refused.communicate(timeout=600)
    assert refused.returncode == 2 and "pass --resume auto" in text

    resumed = launch(out, "--stages", "sft", "--resume", "auto")
    text, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, text[-3000:]
    assert "sft stage 'shallow' already finished" in text
    assert "resuming sft stage 'deep' at step 4" in text
    deep = rows(out / "sft" / "deep" / "metrics.jsonl")
    assert [r["step"] for r in deep] == list(range(1, 13))  # steps 5-12 once, after the kept 1-4
    losses = [r["sft/loss"] for r in deep]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the SFT loss falls

    shallow = rows(out / "sft" / "shallow" / "metrics.jsonl")
    assert shallow[-1]["sft/loss"] < shallow[0]["sft/loss"]
    base_dir = next((tmp_path / "cache").glob("tiny-qwen2-*"))
    base = load_file(base_dir / "model.safetensors")
    after_shallow = load_file(out / "sft" / "shallow" / "model" / "model.safetensors")
    after_deep = load_file(out / "sft" / "deep" / "model" / "model.safetensors")
    frozen = [n for n in base if n.startswith("model.layers.")]
    assert frozen and all(torch.equal(base[n], after_shallow[n]) for n in frozen)  # bit-identical
    assert not torch.equal(base["model.embed_tokens.weight"], after_shallow["model.embed_tokens.weight"])
    assert not all(torch.equal(after_shallow[n], after_deep[n]) for n in frozen)  # stage 2 trains them

    # the rest of the recipe on the same output directory: GRPO from the SFT output, then the comparison
    rest = launch(out, "--stages", "grpo,eval", "--set", "grpo.steps=2", "--set", "grpo.prompts_per_step=4",
                  "--set", "rollout.n=4", "--set", "eval.limit=24", "--set", "logging.wandb.mode=disabled")
    text, _ = rest.communicate(timeout=600)
    assert rest.returncode == 0, text[-3000:]
    assert "sft stage" not in text  # not rerun, not even looked at beyond its output
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == [1, 2]
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert list(comparison["checkpoints"]) == ["base", "sft", "grpo"]
    assert set(comparison["benchmarks"]["demo"]) == {"base", "sft", "grpo"}
    assert (out / "eval" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
