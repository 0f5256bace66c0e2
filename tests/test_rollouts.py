"""A step's rollouts: dealt to the rollout workers by load, and saved with a checkpoint and read back exactly."""

import time

import pytest

from lingshu_rl.config import ModelConfig, RolloutConfig
from lingshu_rl.launch.ray_cluster import init_local_ray
from lingshu_rl.rollout.protocol import Generation, SamplingParams


def test_deal_gives_a_slow_worker_less_and_keeps_prompt_order(tiny):
    import ray
    from transformers import AutoTokenizer

    from lingshu_rl.data.chat import encode_prompt
    from lingshu_rl.data.demo import make_demo_dataset
    from lingshu_rl.grpo.placement import Roles
    from lingshu_rl.grpo.rollouts import deal
    from lingshu_rl.grpo.workers import RolloutWorker
    from lingshu_rl.rollout.hf_engine import TransformersRollout

    class CountingRolloutWorker(RolloutWorker):  # the real engine; counts its calls, and ``delay_s`` slows them
        def __init__(self, *args, delay_s: float = 0.0):
            super().__init__(*args)
            self.delay_s, self.calls = delay_s, 0

        def generate(self, *args, **kwargs):
            self.calls += 1
            time.sleep(self.delay_s)
            return super().generate(*args, **kwargs)

        def count(self) -> int:
            return self.calls

    init_local_ray(num_cpus=2, include_dashboard=False, namespace="test-rollouts", log_to_driver=False,
                   runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        args = (tiny, ModelConfig(), RolloutConfig(engine="transformers"), "cpu", 1)
        worker = ray.remote(CountingRolloutWorker).options(num_cpus=0)
        slow, fast = worker.remote(*args, delay_s=1.5), worker.remote(*args)
        assert ray.get([slow.count.remote(), fast.count.remote()]) == [0, 0]  # both started
        engine = TransformersRollout(tiny, AutoTokenizer.from_pretrained(tiny))
        prompts = [encode_prompt(engine.tokenizer, s) for s in make_demo_dataset(seed=0)[0][:8]]
        params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)

        arrived: list[tuple[int, int, int]] = []  # what scoring would get: each chunk as soon as it is generated
        dealt = deal(Roles(slow, [slow, fast], None, []), prompts, params, [None] * len(prompts),
                     on_chunk=lambda part, gens: arrived.append((part.start, part.stop, len(gens))))
        assert [g.response_ids for g in dealt] == [g.response_ids for g in engine.generate(prompts, params)]
        assert [g.prompt_ids for g in dealt] == [p for p in prompts for _ in range(2)]
        calls = ray.get([slow.count.remote(), fast.count.remote()])
        assert sum(calls) == 4 and calls[0] < calls[1], calls  # 8 prompts in 4 chunks; the slow worker took fewer
        assert sorted(arrived) == [(0, 2, 4), (2, 4, 4), (4, 6, 4), (6, 8, 4)] and arrived[0][0] != 0  # 0: slow
    finally:
        ray.shutdown()


@pytest.mark.parametrize("logprobs", [True, False])
def test_saved_generations_read_back_exactly(tmp_path, logprobs):
    from concurrent.futures import Future

    from lingshu_rl.grpo.rollouts import Rollouts, load_generations, save_generations

    gens = [Generation([1, 2, 3], [4, 5], "a b", "stop", [-0.1234567890123, -2.5] if logprobs else None),
            Generation([1, 2], [6, 7, 8, 9], "c\nd é", "length", [-1e-9, -3.0, -0.5, -7.25] if logprobs else None)]
    done: Future = Future()
    done.set_result(gens)
    save_generations(tmp_path, Rollouts(7, [], [], 5, 24, done))
    header, again = load_generations(tmp_path)
    assert again == gens
    assert (header["step"], header["policy_version"], header["data_position"]) == (7, 5, 24)
    assert load_generations(tmp_path / "elsewhere") is None


def test_scores_of_chunks_join_in_order():
    from lingshu_rl.rewards.base import RewardResult
    from lingshu_rl.rewards.pool import Failure, ScoredBatch

    first = ScoredBatch([RewardResult(1.0), RewardResult(0.0)], [Failure(1, "a", "error", "boom")], 0.5)
    second = ScoredBatch([RewardResult(0.5), RewardResult(0.0)], [Failure(1, "b", "timeout", "slow")], 0.25)
    joined = ScoredBatch.concat([first, second])
    assert joined.scores == [1.0, 0.0, 0.5, 0.0] and joined.seconds == 0.75
    assert [(f.index, f.sample_id) for f in joined.failures] == [(1, "a"), (3, "b")]
    assert joined.stats() == {"reward/failures": 2.0, "reward/failures_error": 1.0, "reward/failures_timeout": 1.0}


def test_reward_items_carry_image_paths_not_pixels():
    from lingshu_rl.data.sample import Sample

    sample = Sample(id="s1", messages=[{"role": "user", "content": "Which stain?"}], answer="A",
                    images=["/data/slide.png", b"\x89PNG" + bytes(2000)])
    assert sample.reward_fields()["images"] == ["/data/slide.png", "<image: 2004 bytes>"]
