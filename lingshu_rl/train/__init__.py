"""Training engines behind one protocol: plain torch/transformers and megatron-core tensor parallelism."""

from lingshu_rl.train.batch import TokenBatch, collate
from lingshu_rl.train.protocol import Loss, TrainEngine

__all__ = ["Loss", "TokenBatch", "TrainEngine", "collate"]
