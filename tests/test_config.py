"""Typed config: YAML + dotted overrides, and errors that name the key and list the valid choices."""

from pathlib import Path

import pytest

from lingshu_rl.config import ConfigError, RunConfig, load_config
from lingshu_rl.launch.cli import DEMO_PRESET

RECIPES = sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml"))


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("grpo: {steps: 5, kl_coef: 0}\nrollout: {stop: ['</answer>']}\n")
    cfg = load_config(path, ["rollout.n=4", "train.lr=3e-6", "train.betas=[0.9, 0.95]", "cluster.address=auto",
                             "train.lr_groups={'model.visual.*': 2.0e-6}"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.grpo.steps, cfg.grpo.kl_coef, cfg.rollout.n, cfg.train.lr) == (5, 0.0, 4, 3e-6)
    assert cfg.train.betas == (0.9, 0.95) and cfg.rollout.stop == ["</answer>"]
    assert cfg.cluster.address == "auto" and cfg.train.lr_groups == {"model.visual.*": 2e-6}
    assert cfg.model.trust_remote_code is False and cfg.cluster.dashboard_host == "127.0.0.1"


def test_list_items_by_index() -> None:
    cfg = load_config(DEMO_PRESET, ["sft.stages.0.steps=7", "sft.stages.0.freeze=[model.layers.0.*]"])
    assert cfg.sft.stages[0].steps == 7 and cfg.sft.stages[0].freeze == ["model.layers.0.*"]
    with pytest.raises(ConfigError, match="'3' is not an index of a 1-item list"):
        load_config(DEMO_PRESET, ["sft.stages.3.steps=7"])


@pytest.mark.parametrize("override, message", [
    ("grpo.kl_cof=0.1", "unknown config key 'grpo.kl_cof'; valid keys under 'grpo': steps, prompts_per_step"),
    ("rollout.n=many", "rollout.n: expected int, got str 'many'"),
    ("rollout.temperature=[1]", "rollout.temperature: expected float, got list"),
    ("grpo.loss_agg=mean", "grpo.loss_agg: 'mean' is not one of 'token-mean', 'seq-mean-token-mean'"),
    ("model.trust_remote_code=yes please", "model.trust_remote_code: expected bool"),
    ("sft.stages.0.data.0.pth=x.jsonl", "unknown config key 'sft.stages[0].data[0].pth'; valid keys under"),
    ("rollout.n=1", "rollout.n must be >= 2"),
    ("nonsense=1", "unknown config key 'nonsense'; valid keys: seed, output_dir, model"),
    ("grpo", "must look like key.path=value"),
])
def test_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO_PRESET, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["grpo.one_step_off=true", "rollout.engine=transformers"], "grpo.one_step_off needs the rollout engine's"),
    (["grpo.one_step_off=true", "rollout.engine=vllm", "cluster.hybrid=true"], "grpo.one_step_off needs a process"),
    (["rollout.max_new_tokens=8", "rollout.min_new_tokens=9"], "rollout.min_new_tokens must be between 0 and"),
    (["train.sequence_parallel=true", "train.engine=megatron"], "train.sequence_parallel needs train.engine=megatron "
                                                                "and train.tensor_parallel_size > 1"),
    (["train.strategy=fsdp2", "train.data_parallel_size=4", "train.shard_size=3"], "train.shard_size needs"),
    (["train.shard_size=2"], "train.shard_size needs train.strategy=fsdp2"),
])
def test_combinations_that_cannot_run_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["grpo.one_step_off=true", "rollout.engine=vllm"]).grpo.one_step_off


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_are_valid(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.sft.stages and cfg.grpo.steps > 0 and cfg.eval.benchmarks
