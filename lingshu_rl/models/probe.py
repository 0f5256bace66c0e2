"""What each module of a model computes on one input: the per-module check behind the weight-sync canary.

Comparing the weights themselves across engines does not work: vLLM fuses q/k/v and gate/up into one
parameter, pads the vocabulary, and on CPU repacks every linear layer's weight into a oneDNN handle, leaving the
parameter empty. So the check compares what the modules *compute*: forward hooks record each module's output
on the canary, on the actor and on the rollout engine, and the first module in execution order whose output
differs is the one holding different weights (everything before it agreed, so its inputs did). That also
checks the weights in the form the engine really uses, repacked or not.

The modules are the children of each repeated block (``model.layers.3.self_attn``, ``model.layers.3.mlp``,
``model.visual.blocks.3.attn``, ...) and the other modules holding parameters (``model.embed_tokens``,
``model.norm``, ...): units whose tensors every engine keeps together, whatever it fuses inside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


def module_of(parameter: str) -> str:
    """The probed module holding ``parameter``: up to the child of a numbered block, else the parameter's own
    module. ``model.layers.3.self_attn.q_proj.weight`` -> ``model.layers.3.self_attn``; ``model.norm.weight`` ->
    ``model.norm``."""
    parts = parameter.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    end = len(parts) - 1 if index is None else min(index + 2, len(parts) - 1)
    return ".".join(parts[:end])


def probed_modules(parameters: Iterable[str]) -> list[str]:
    """The probed modules of a model with these parameter names (each once, in order)."""
    return list(dict.fromkeys(module_of(name) for name in parameters))


@contextmanager
def capture(model: torch.nn.Module, names: dict[str, str]) -> Iterator[dict[str, Tensor]]:
    """Record the first output of each module of ``model`` named in ``names`` (its name in ``model`` -> the name to
    report), as a flat float32 CPU tensor, in the order the modules ran. Names ``model`` lacks are skipped."""
    outputs: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def hook(report: str):
        def record(module: torch.nn.Module, args: object, output: object) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            if report not in outputs and isinstance(first, Tensor):  # a copy: the engine may change it in place
                outputs[report] = first.detach().to("cpu", torch.float32, copy=True).flatten()
        return record

    handles = [modules[own].register_forward_hook(hook(report)) for own, report in names.items() if own in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def first_difference(reference: dict[str, Tensor], other: dict[str, Tensor], rtol: float) -> str | None:
    """The first module (in ``reference``'s order) whose output in ``other`` differs by more than ``rtol`` times
    the output's largest magnitude; None if all agree. Modules one side did not record are skipped."""
    for name, expected in reference.items():
        got = other.get(name)
        if got is None or got.numel() != expected.numel():
            continue
        scale = float(expected.abs().max().clamp(min=1e-6))
        if float((got - expected).abs().max()) > rtol * scale:
            return name
    return None
