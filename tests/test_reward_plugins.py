"""Plugin resolution order, weighted combinations and the verl / TRL adapters (against their real code)."""

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from lingshu_rl.rewards import call_reward, resolve_reward
from lingshu_rl.rewards.adapters import from_trl, to_trl
from lingshu_rl.rewards.combine import RewardSpec, build_reward, parse_reward_arg, specs_from_config
from lingshu_rl.rewards.registry import RewardResolutionError

OPTIONS = {"A": "Metformin", "B": "Insulin", "C": "Glipizide", "D": "Pioglitazone"}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path holding a module and an installed distribution with our entry points."""
    write(tmp_path / "my_rewards.py", """
        def length_bonus(response, answer, **_):
            return {"score": min(len(response), 10) / 10, "chars": len(response)}

        def mcq_exact(response, answer, **_):
            return -1.0
    """)
    dist = tmp_path / "my_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[lingshu_rl.rewards]\nlength_bonus = my_rewards:length_bonus\nmcq_exact = my_rewards:mcq_exact\n"
        "broken = my_rewards:does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def test_builtin_beats_entry_point_of_same_name(plugin_dir: Path) -> None:
    fn = resolve_reward("mcq_exact")
    assert fn.__module__ == "lingshu_rl.rewards.mcq"
    assert call_reward(fn, "A", "A", {"options": OPTIONS}).score == 1.0


def test_entry_point_is_found(plugin_dir: Path) -> None:
    result = call_reward(resolve_reward("length_bonus"), "hello", "x")
    assert result.score == 0.5 and result.details == {"chars": 5.0}


def test_module_and_file_references(plugin_dir: Path) -> None:
    assert call_reward(resolve_reward("my_rewards:length_bonus"), "abc", "x").score == pytest.approx(0.3)
    path = write(plugin_dir / "in_a_file.py", "def exact(response, answer):\n    return float(response == answer)\n")
    fn = resolve_reward(f"{path}:exact")
    assert call_reward(fn, "yes", "yes", {"options": None, "id": "7"}).score == 1.0  # unaccepted fields dropped


def test_bad_reference_lists_every_attempt(plugin_dir: Path) -> None:
    with pytest.raises(RewardResolutionError) as err:
        resolve_reward("no_such_reward")
    message = str(err.value)
    assert "built-in name (known: answer_norm, format, mcq_exact" in message
    assert "none named 'no_such_reward'" in message and "has no ':'" in message

    with pytest.raises(RewardResolutionError) as err:
        resolve_reward("missing_dir/rewards.py:fn")
    assert "file 'missing_dir/rewards.py:fn': FileNotFoundError" in str(err.value)
    assert "module 'missing_dir/rewards.py:fn'" in str(err.value)

    with pytest.raises(RewardResolutionError, match="failed to load"):
        resolve_reward("broken")
    with pytest.raises(RewardResolutionError, match="has no attribute 'nope'"):
        resolve_reward("my_rewards:nope")


def test_parse_and_combine() -> None:
    assert parse_reward_arg("0.5*format + 1.0*mcq_exact") == [RewardSpec("format", 0.5), RewardSpec("mcq_exact", 1.0)]
    assert parse_reward_arg("format=0.5") == [RewardSpec("format", 0.5)]
    assert parse_reward_arg("pkg.mod:fn") == [RewardSpec("pkg.mod:fn")]
    assert parse_reward_arg("1e-1*format+2*mcq_exact") == [RewardSpec("format", 0.1), RewardSpec("mcq_exact", 2.0)]
    reward = build_reward("0.5*format + 1.0*mcq_exact")
    good = call_reward(reward, "<think>metformin is first line</think>\n<answer>A</answer>", "A", {"options": OPTIONS})
    assert good.score == 1.5 and good.details["format"] == 1.0 and good.details["mcq_exact"] == 1.0
    bad_format = call_reward(reward, "The answer is A.", "A", {"options": OPTIONS})
    assert bad_format.score == 1.0 and bad_format.details["format"] == 0.0
    specs = specs_from_config([{"ref": "format", "weight": 0.5, "kwargs": {"think_tag": None}}, "mcq_exact"])
    only_answer = call_reward(build_reward(specs), "<answer>A</answer>", "A", {"options": OPTIONS})
    assert only_answer.score == 1.5
    with pytest.raises(ValueError, match="ref, weight, kwargs"):
        specs_from_config([{"name": "format"}])


VERL_STYLE = """
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        assert data_source == "medqa", data_source
        return {"score": float(ground_truth in solution_str), "length": len(solution_str)}
"""


def test_verl_function_works_as_lingshu_reward(tmp_path: Path) -> None:
    path = write(tmp_path / "verl_reward.py", VERL_STYLE)
    fn = resolve_reward(f"{path}:compute_score")
    result = call_reward(fn, "answer: B", "B", {"data_source": "medqa", "id": "1"})
    assert result.score == 1.0 and result.details == {"length": 9.0}


def test_verl_own_default_compute_score_as_lingshu_reward() -> None:
    verl_scores = pytest.importorskip("verl.utils.reward_score")
    fn = resolve_reward("verl.utils.reward_score:default_compute_score")
    assert call_reward(fn, "so the total is 72.\n#### 72", "72", {"data_source": "openai/gsm8k"}).score == 1.0
    assert call_reward(fn, "#### 71", "72", {"data_source": "openai/gsm8k"}).score == 0.0
    assert verl_scores.default_compute_score is not None


def test_lingshu_reward_loaded_by_verls_own_loader(tmp_path: Path) -> None:
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    path = write(tmp_path / "lingshu_for_verl.py", """
        from lingshu_rl.rewards.adapters import to_verl
        compute_score = to_verl("0.5*format + 1.0*mcq_exact")
    """)
    custom = {"path": str(path), "name": "compute_score"}
    # verl 0.4 reads `custom_reward_function` at the top level, newer releases under `reward`
    config = OmegaConf.create({"custom_reward_function": custom, "reward": {"custom_reward_function": custom}})
    compute_score = get_custom_reward_fn(config)
    # keyword call, exactly as verl's NaiveRewardManager makes it
    out = compute_score(data_source="medqa", solution_str="<think>x</think><answer>B</answer>", ground_truth="B",
                        extra_info={"options": OPTIONS, "num_turns": None})
    assert out["score"] == 1.5 and out["format"] == 1.0 and out["mcq_exact"] == 1.0


def test_trl_own_reward_as_lingshu_reward() -> None:
    pytest.importorskip("trl")
    fn = resolve_reward("trl.rewards:think_format_reward")
    assert call_reward(fn, "<think>reasoning</think>The answer is A", "A").score == 1.0
    assert call_reward(fn, "The answer is A", "A").score == 0.0


def test_trl_none_means_not_applicable() -> None:
    fn = from_trl(lambda prompts, completions, **kw: [None])
    result = call_reward(fn, "x", "y")
    assert result.score == 0.0 and result.details == {"not_applicable": 1.0}


def test_lingshu_reward_called_as_trl_grpo_trainer_calls_it() -> None:
    trl = pytest.importorskip("trl")
    reward_func = to_trl("mcq_exact")
    assert reward_func.__name__ == "mcq_exact"
    completions = [[{"role": "assistant", "content": "The answer is (A)."}],
                   [{"role": "assistant", "content": "<answer>insulin</answer>"}]]
    prompts = [[{"role": "user", "content": "First-line for T2DM?"}]] * 2
    # GRPOTrainer passes dataset columns as lists plus its own objects (trainer_state, log_extra, log_metric)
    scores = reward_func(prompts=prompts, completions=completions, completion_ids=[[1, 2], [3]],
                         answer=["A", "A"], options=[OPTIONS, OPTIONS], trainer_state=trl.TrainerState() if hasattr(trl, "TrainerState") else None,
                         log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
    assert scores == [1.0, 0.0]
    assert to_trl("answer_norm")(prompts=["q"], completions=["Yes."], solution=["yes"]) == [1.0]
    with pytest.raises(KeyError, match="no 'answer' column"):
        to_trl("mcq_exact")(prompts=["q"], completions=["A"], label=["A"])
