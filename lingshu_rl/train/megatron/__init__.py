"""The megatron-core tensor-parallel training engine (``train.engine: megatron``, extra ``[megatron]``).

convert.py (HF <-> megatron weights per rank), model.py (the GPTModel), engine.py (one rank), group.py (Ray
actors, one per rank, and the driver's handle), cpu_compat.py (what megatron-core needs to run without a GPU).
Nothing here imports megatron-core at package import time.
"""
