"""Multi-node runs need the output directory on storage that every node mounts; the launcher checks it first.

Every rank writes its own checkpoint shards into the output directory, the actor the Hugging Face export, the
scorer its log, and the driver the metadata beside them: a directory local to each node would leave each
checkpoint in pieces on different machines, found missing only at the first resume. So at launch, when Ray has
more than one node with CPUs, one task pinned to each of them writes a marker holding a random token into
``OUTPUT_DIR/.lingshu_nodes/`` (the driver writes one too), then each checks that it reads all the others';
the markers are removed afterwards.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

MARKERS = ".lingshu_nodes"
DRIVER = "driver"


class StorageNotShared(RuntimeError):
    """The nodes do not see each other's files in the output directory; the message names them."""


def _write(directory: str, me: str, token: str, keys: list[str]) -> list[str]:
    Path(directory).mkdir(parents=True, exist_ok=True)  # on a node that does not share it: its own copy
    (Path(directory) / f"{token}.{me}").write_text(token)
    return []


def _unseen(directory: str, me: str, token: str, keys: list[str]) -> list[str]:
    """The other participants whose marker this process cannot read (retried briefly: a network file system
    may cache a directory listing for a few seconds)."""

    def reads(key: str) -> bool:
        try:
            return (Path(directory) / f"{token}.{key}").read_text() == token
        except OSError:
            return False

    deadline = time.monotonic() + 5
    while True:
        missing = [k for k in keys if k != me and not reads(k)]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.5)


def _remove(directory: str, me: str, token: str, keys: list[str]) -> list[str]:
    (Path(directory) / f"{token}.{me}").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the last one out (or a node alone with its own copy) removes the folder
        Path(directory).rmdir()
    return []


@ray.remote(num_cpus=0, max_retries=0)
def _run(fn: Any, *args: Any) -> Any:
    return fn(*args)


def check_shared_storage(output_dir: Path, timeout_s: float = 120.0) -> None:
    """Raise :class:`StorageNotShared` unless the driver and every alive Ray node with CPUs read each other's
    files under ``output_dir``. One node (or none with CPUs beside the driver's): nothing to check."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2:
        return
    directory = str(output_dir.resolve() / MARKERS)
    token = secrets.token_hex(8)
    names = {DRIVER: f"the driver ({ray.util.get_node_ip_address()})",
             **{n["NodeID"]: f"node {n['NodeManagerAddress']} (node id {n['NodeID']})" for n in nodes}}
    keys = list(names)

    def everywhere(fn: Any, timeout_s: float = timeout_s) -> dict[str, list[str]]:
        refs = {n["NodeID"]: _run.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(fn, directory, n["NodeID"], token, keys) for n in nodes}
        results = {DRIVER: fn(directory, DRIVER, token, keys)}
        ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        if pending:
            silent = [names[k] for k, ref in refs.items() if ref in pending]
            raise StorageNotShared(f"checking the output directory {output_dir} on every node: {', '.join(silent)} "
                                   f"did not answer within {timeout_s:g} s")
        return {**results, **{k: ray.get(ref) for k, ref in refs.items()}}

    try:
        everywhere(_write)
        unseen = everywhere(_unseen)
    finally:
        with contextlib.suppress(StorageNotShared):  # a node that did not answer is reported already
            everywhere(_remove, timeout_s=10)
    problems = [f"  - {names[reader]} does not see the files of: {', '.join(names[k] for k in missing)}"
                for reader, missing in unseen.items() if missing]
    if problems:
        raise StorageNotShared(
            f"the output directory {output_dir.resolve()} is not shared by the Ray nodes:\n" + "\n".join(problems)
            + "\n  multi-node runs need output_dir on storage that every node mounts at the same path (NFS or "
              "another shared file system): each rank writes its own checkpoint shards there and the driver the "
              "metadata beside them. Choose such a path with --output-dir (or output_dir in the config).")
