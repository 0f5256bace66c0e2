"""GRPO across several Ray nodes on this machine, through the launcher with ``--ray-address``.

Real multi-node clusters (``ray.cluster_utils.Cluster``): a head with no CPUs (no training resources) and two
worker nodes told apart by custom resources, ``trainer`` and ``sampler``. The roles are pinned to them with
``cluster.*_resources`` and where each named actor ran is read back from Ray's state API. A worker node whose
output directory is a private tmpfs (its own mount namespace: ``unshare -m``) must stop the launch before any
training; a node removed mid-run must stop the run naming the role, the node and the last checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lingshu_rl.launch.ray_cluster import free_port, retry_node_startup

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MB = 1024 * 1024
TINY = ["grpo.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8", "logging.wandb.mode=disabled",
        "cluster.include_dashboard=false", "checkpoint.every=1", "logging.console=false"]
# actor ranks on the `trainer` node (1 CPU); rollout, reference and scorer on the `sampler` node (2 CPUs)
SPLIT = ["cluster.colocate=false", "cluster.actor_cpus=0.5", "cluster.actor_resources={trainer: 1}",
         "cluster.rollout_cpus=0.5", "cluster.rollout_resources={sampler: 1}",
         "cluster.ref_cpus=0.25", "cluster.ref_resources={sampler: 1}",
         "reward.workers=1", "cluster.reward_resources={sampler: 1}"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the tiny model, built once for the module


@dataclass
class Launch:
    """A launcher process whose output goes to files (a pipe nobody reads while it runs could fill up)."""

    proc: subprocess.Popen
    logs: Path

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the launcher did not finish within {timeout} s:\n{self.output()[1][-5000:]}")
        return (self.proc.returncode, *self.output())

    def output(self) -> tuple[str, str]:
        return self.logs.with_suffix(".stdout").read_text(), self.logs.with_suffix(".stderr").read_text()


def launch(out: Path, cache: Path, address: str, *sets: str, args: tuple[str, ...] = ()) -> Launch:
    cmd = [sys.executable, "-m", "lingshu_rl.launch", "--reward", "mcq_exact", "--output-dir", str(out),
           "--stages", "sft,grpo", "--ray-address", address, *args]
    for item in [*TINY, *sets]:
        cmd += ["--set", item]
    env = {**os.environ, "LINGSHU_CACHE": str(cache)}
    env.pop("RAY_ADDRESS", None)
    logs = out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.stdout')))}"
    with open(logs.with_suffix(".stdout"), "w") as stdout, open(logs.with_suffix(".stderr"), "w") as stderr:
        return Launch(subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True), logs)


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def start_cluster(dashboard: bool = False):
    """A head with no CPUs plus the `trainer` node (1 CPU); the caller adds the `sampler` node."""
    import ray
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "include_dashboard": dashboard, "object_store_memory": 200 * MB}
    if dashboard:
        head["dashboard_port"] = free_port("127.0.0.1")
    cluster = retry_node_startup(lambda: Cluster(initialize_head=True, head_node_args=head))
    trainer = add_node(cluster, num_cpus=1, resources={"trainer": 2})
    ray.init(address=cluster.address, namespace="test-multinode")
    return cluster, trainer


def add_node(cluster, **options):
    return retry_node_startup(lambda: cluster.add_node(**options, object_store_memory=200 * MB))


def stop_cluster(cluster) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def node_ids() -> dict[str, str]:
    """Alive node id -> "head" / "trainer" / "sampler"."""
    import ray

    kinds = {}
    for node in ray.nodes():
        if node["Alive"]:
            resources = node["Resources"]
            kinds[node["NodeID"]] = next((k for k in ("trainer", "sampler") if k in resources), "head")
    return kinds


# --- a full run: placement, metrics, checkpoints, resume --------------------------------------------------------

@pytest.fixture
def three_nodes():
    cluster, _ = start_cluster(dashboard=True)  # the state API is served by the head's dashboard
    add_node(cluster, num_cpus=2, resources={"sampler": 4})
    cluster.wait_for_nodes()
    yield cluster
    stop_cluster(cluster)


def test_grpo_on_three_nodes_places_each_role_on_its_node_and_resumes(three_nodes, cache: Path,
                                                                      tmp_path: Path) -> None:
    from ray.util.state import list_actors

    out = tmp_path / "run"
    fsdp = ["train.strategy=fsdp2", "train.data_parallel_size=2", "sft.stages.0.steps=3", "sft.stages.0.batch_size=8"]
    code, stdout, stderr = launch(out, cache, three_nodes.address, *SPLIT, *fsdp, "grpo.steps=2").finish()
    assert code == 0, stdout[-3000:] + stderr[-5000:]
    assert steps(out) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert (out / "checkpoints" / "step_000002" / "model" / "config.json").is_file()
    assert (out / "reward_workers.log").is_file()  # opened by the scorer on the sampler node, in the shared dir
    assert not (out / ".lingshu_nodes").exists()  # the storage check cleaned up after itself

    kinds = node_ids()
    assert sorted(kinds.values()) == ["head", "sampler", "trainer"]
    ran_on = {a.name: kinds[a.node_id] for a in list_actors(filters=[("name", "!=", "")], detail=True, limit=1000)
              if a.name.startswith("lingshu/")}
    assert ran_on == {"lingshu/sft-warmup": "trainer", "lingshu/sft-warmup/rank1": "trainer",
                      "lingshu/actor-0": "trainer", "lingshu/actor-0/rank1": "trainer",
                      "lingshu/rollout-0": "sampler", "lingshu/ref-0": "sampler", "lingshu/ref-0/rank1": "sampler",
                      "lingshu/reward-0": "sampler"}, ran_on

    code, stdout, stderr = launch(out, cache, three_nodes.address, *SPLIT, *fsdp, "grpo.steps=3",
                                  args=("--resume", "auto")).finish()
    assert code == 0, stdout[-3000:] + stderr[-5000:]
    assert "resuming from" in stdout and "step_000002" in stdout
    assert steps(out) == [1, 2, 3]
    assert (out / "checkpoints" / "step_000003" / "state.json").is_file()


# --- a node removed mid-run ---------------------------------------------------------------------------------------

def test_removed_node_stops_the_run_naming_role_node_and_checkpoint(cache: Path, tmp_path: Path) -> None:
    cluster, _ = start_cluster()
    try:
        sampler = add_node(cluster, num_cpus=2, resources={"sampler": 4})
        cluster.wait_for_nodes()
        sampler_id = next(k for k, kind in node_ids().items() if kind == "sampler")
        out = tmp_path / "dies"
        # reward.workers=0: the scorer scores in its own process (its bundle a sliver of a CPU)
        run = launch(out, cache, cluster.address, *SPLIT, "sft.stages=[]", "grpo.steps=5000", "reward.workers=0")
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("step_*")):  # every step writes one
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
            time.sleep(0.5)
        cluster.remove_node(sampler)
        start = time.monotonic()
        code, stdout, stderr = run.finish(timeout=240)
        seconds = time.monotonic() - start
    finally:
        stop_cluster(cluster)
    assert code == 1, stdout[-3000:] + stderr[-5000:]
    error = next(line for line in stderr.splitlines() if line.startswith("error: "))
    assert any(f"the worker 'lingshu/{role}' died" in error for role in ("rollout-0", "ref-0", "reward-0")), error
    assert f"(node id {sampler_id}), which has left the Ray cluster" in error, error
    last = error.split("Last checkpoint: ", 1)[1]
    assert str(out / "checkpoints" / "step_") in last and "--resume auto" in last
    assert "Traceback" not in stdout + stderr, stderr[-5000:]
    assert seconds < 120, seconds


# --- an output directory the nodes do not share ------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (mount ns)")
def test_output_dir_not_shared_stops_before_training_naming_the_node(cache: Path, tmp_path: Path) -> None:
    cluster, _ = start_cluster()
    out = tmp_path / "local-only"
    out.mkdir()
    # the sampler node sees its own empty tmpfs at the output directory's path (as a node-local disk would be)
    mount = f"mount -t tmpfs none {out}"
    node = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f"{mount} && exec {BIN / 'ray'} start --address={cluster.address} --num-cpus=1 "
         f"--resources='{{\"sampler\": 4}}' --object-store-memory={200 * MB} --block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "sampler" not in node_ids().values():
            assert node.poll() is None and time.monotonic() < deadline, "the unshared node did not join"
            time.sleep(0.5)
        ids = {kind: k for k, kind in node_ids().items()}
        start = time.monotonic()
        code, stdout, stderr = launch(out, cache, cluster.address, *SPLIT, "grpo.steps=2").finish(timeout=240)
        seconds = time.monotonic() - start
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
        stop_cluster(cluster)
    assert code == 2, stdout[-3000:] + stderr[-5000:]
    assert f"the output directory {out} is not shared by the Ray nodes" in stderr, stderr
    lines = stderr.splitlines()
    sampler_line = next(line for line in lines if f"node id {ids['sampler']}) does not see the files of" in line)
    assert "the driver (" in sampler_line and f"node id {ids['trainer']}" in sampler_line
    driver_line = next(line for line in lines if line.startswith("  - the driver ("))
    assert f"node id {ids['sampler']}" in driver_line and f"node id {ids['trainer']}" not in driver_line
    assert "NFS" in stderr and "checkpoint shards" in stderr
    assert "sft stage" not in stdout and not (out / "checkpoints").exists()  # nothing trained
    assert not (out / ".lingshu_nodes").exists()  # markers removed
    assert seconds < 120, seconds


# --- a reward file travels as source text (a node need not have the file) ---------------------------------------

def test_reward_file_scores_where_the_file_does_not_exist(tmp_path: Path) -> None:
    from lingshu_rl.rewards import resolve_reward
    from lingshu_rl.rewards.pool import ScoreItem
    from lingshu_rl.rewards.remote import RewardActor, reward_payload
    from lingshu_rl.rewards.sandbox import Limits

    path = tmp_path / "gone.py"
    path.write_text("def picky(response, answer, **_):\n    if response == 'x':\n        raise ValueError('no x')\n"
                    "    return float(response == answer)\n")
    payload = reward_payload(resolve_reward(f"{path}:picky"))
    path.unlink()  # as on a node that never had it: the scorer's fresh worker process loads the shipped source
    scorer = RewardActor(payload, 1, 10.0, -1.0, Limits(), None)
    try:
        batch = scorer.score([ScoreItem("x", "A", {"id": "q0"}), ScoreItem("A", "A", {"id": "q1"})])
    finally:
        scorer.close()
    assert batch.scores == [-1.0, 1.0]
    assert batch.failures[0].sample_id == "q0" and f"ValueError: no x (at {path}:3)" in batch.failures[0].message
