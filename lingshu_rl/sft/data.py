"""SFT data: read a stage's sources, mix them by epochs or weights, and plan each step's samples."""

from __future__ import annotations

import random

from lingshu_rl.config import SFTSourceConfig, SFTStageConfig
from lingshu_rl.data.builtin import DATA, builtin_train_split
from lingshu_rl.data.demo import demo_sft_sample
from lingshu_rl.data.readers import read_samples
from lingshu_rl.data.sample import Sample


def read_source(source: SFTSourceConfig, seed: int) -> list[Sample]:
    if source.path in DATA:  # the built-in demos: their targets are the gold option's text in answer tags
        return [demo_sft_sample(s) for s in builtin_train_split(source.path, seed)]
    samples = read_samples(source.path, source.skip_missing_images)
    missing = [s.id for s in samples if not any(m["role"] == "assistant" for m in s.messages)]
    if missing:
        raise ValueError(f"{source.path}: {len(missing)} sample(s) have no assistant turn to learn "
                         f"(first: {missing[0]!r}); add a `target` column or an assistant message")
    return samples


def plan_steps(stage: SFTStageConfig, sources: list[list[Sample]], seed: int) -> list[list[Sample]]:
    """The samples of every optimiser step of the stage, fixed in advance (so a resumed stage continues exactly).

    Epoch mixing: each source contributes ``epochs`` passes (a fraction: a seeded subset), shuffled together;
    ``stage.steps`` (if set) cycles or cuts that sequence. Weight mixing: each step draws its samples from the
    sources with probabilities proportional to their weights.
    """
    rng = random.Random(f"sft-{stage.name}-{seed}")
    weighted = [s.weight is not None for s in stage.data]
    if any(weighted):
        if not all(weighted) or stage.steps <= 0:
            raise ValueError(f"stage {stage.name!r}: weight mixing needs a weight on every source and stage steps > 0")
        weights = [s.weight for s in stage.data if s.weight is not None]  # all of them (checked above)
        return [[rng.choice(sources[rng.choices(range(len(sources)), weights)[0]]) for _ in range(stage.batch_size)]
                for _ in range(stage.steps)]
    mixed: list[Sample] = []
    for source, samples in zip(stage.data, sources):
        whole, fraction = divmod(source.epochs, 1.0)
        for _ in range(int(whole)):
            mixed += rng.sample(samples, len(samples))
        mixed += rng.sample(samples, round(fraction * len(samples)))
    rng.shuffle(mixed)
    if not mixed:
        raise ValueError(f"stage {stage.name!r} has no samples")
    steps = stage.steps or -(-len(mixed) // stage.batch_size)
    return [[mixed[(i * stage.batch_size + k) % len(mixed)] for k in range(stage.batch_size)] for i in range(steps)]
