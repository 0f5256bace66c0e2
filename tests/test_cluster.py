"""The launcher and Ray clusters: a layout that cannot be placed stops with a message (never a silent wait),
the default command never joins someone else's cluster, and the README's job submission runs as written.

Real Ray throughout: local clusters, a `ray start --head` head in its own process group, and a multi-node
`ray.cluster_utils.Cluster` on this machine.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lingshu_rl.config import load_config
from lingshu_rl.grpo.placement import GroupRequest, PlacementError, check_fits, layout, wait_placed
from lingshu_rl.launch.ray_cluster import free_port, init_local_ray, retry_node_startup

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_RUN = ["sft.stages.0.steps=20", "sft.stages.0.batch_size=8", "grpo.steps=2", "grpo.prompts_per_step=2",
            "rollout.n=2", "rollout.max_new_tokens=8", "eval.limit=4", "logging.wandb.mode=disabled",
            "cluster.include_dashboard=false"]


def launcher(out: Path, *sets: str, env: dict | None = None, timeout: float = 600,
             stages: str = "sft,grpo,eval") -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lingshu_rl.launch", "--reward", "mcq_exact", "--output-dir", str(out),
            "--stages", stages]
    for item in [*TINY_RUN, *sets]:
        args += ["--set", item]
    env = {**os.environ, "LINGSHU_CACHE": str(out.parent / "cache"), **(env or {})}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


# --- layouts the cluster cannot place (a local cluster through the launcher) -------------------------------------

def test_split_layout_on_two_cpus_stops_at_once_naming_each_role(tmp_path: Path) -> None:
    start = time.monotonic()
    result = launcher(tmp_path / "split", "cluster.colocate=false", "cluster.num_cpus=2", timeout=120)
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    err = result.stderr
    # actor, rollout and reference 1 CPU each, the scorer one per reward process (reward.workers: 2)
    assert "cannot place the GRPO roles" in err and "CPU: the layout asks for 5 in all, the cluster has 2" in err
    for role in ("actor: 1 bundle(s) of {CPU: 1}", "rollout: 1 bundle(s) of {CPU: 1}", "ref: 1 bundle(s)",
                 "reward: 1 bundle(s) of {CPU: 2}"):
        assert role in err, err
    assert "cluster.colocate=true" in err and "cluster.num_cpus" in err
    assert "sft stage" not in result.stdout  # stopped before the SFT warm-up started any actor
    assert seconds < 60, seconds


def test_gpu_layout_on_a_cpu_only_cluster_stops(tmp_path: Path) -> None:
    result = launcher(tmp_path / "gpu", "cluster.actor_gpus=1", timeout=120)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "GPU: the layout asks for 1 in all, the cluster has 0" in result.stderr
    assert "actor+rollout+ref: 1 bundle(s) of {CPU: 1, GPU: 1}" in result.stderr


def test_local_ray_starts_again_after_its_startup_times_out(monkeypatch, capsys) -> None:
    """Ray gives a raylet 30 s to register; on a busy machine it can miss that (seen once in CI). The first attempt's
    raylet is made to miss it; its processes must be gone and the second attempt must give a working cluster."""
    import psutil
    import ray

    register = ray._private.services.get_node
    first_attempt: list = []

    def times_out_once(*args, **kwargs):
        if not first_attempt:
            first_attempt.extend((p, " ".join(p.cmdline())) for p in psutil.Process().children(recursive=True))
            raise Exception("The current node timed out during startup. (injected by the test)")
        return register(*args, **kwargs)

    monkeypatch.setattr(ray._private.services, "get_node", times_out_once)
    init_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False, namespace="test-startup-retry")
    try:
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        names = " ".join(cmdline for _, cmdline in first_attempt)
        assert "gcs_server" in names and "raylet" in names, names

        def alive(process) -> bool:
            try:
                return process.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        assert not [cmdline for process, cmdline in first_attempt if alive(process)]
        assert "a Ray node's start-up timed out (attempt 1 of 3" in capsys.readouterr().out
    finally:
        ray.shutdown()


# --- a multi-node cluster: a TP group that fits in total but not on one node; resources held by another job ---

@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = retry_node_startup(lambda: Cluster(initialize_head=True,
                                                 head_node_args={"num_cpus": 0, "include_dashboard": False}))
    retry_node_startup(lambda: cluster.add_node(num_cpus=1, resources={"node_a": 1}))
    retry_node_startup(lambda: cluster.add_node(num_cpus=1, resources={"node_b": 1}))
    ray.init(address=cluster.address, namespace="test-cluster-layouts")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def megatron_split(tmp_path: Path, **cluster_sets: object):
    sets = ["train.engine=megatron", "train.tensor_parallel_size=2", "cluster.colocate=false",
            "cluster.rollout_cpus=0", "cluster.ref_cpus=0", "grpo.kl_coef=0", "reward.workers=0"]
    sets += [f"cluster.{k}={v}" for k, v in cluster_sets.items()]
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    return load_config(config, sets)


def test_tensor_parallel_group_must_fit_on_one_node(two_nodes, tmp_path: Path) -> None:
    cfg = megatron_split(tmp_path, actor_cpus=0.9)  # 1.8 CPUs: fits the cluster's 2, not one node's 1
    requests = layout(cfg, with_ref=False)
    assert [(r.role, r.strategy, len(r.bundles)) for r in requests] == [("actor", "STRICT_PACK", 2),
                                                                         ("rollout", "PACK", 1), ("reward", "PACK", 1)]
    with pytest.raises(PlacementError) as err:
        check_fits(requests)
    message = str(err.value)
    assert "actor: its 2 ranks ({CPU: 1.8}) must share one node (STRICT_PACK)" in message
    assert "CPU: the layout asks" not in message  # 2 CPUs in all: the total fits, one node does not
    assert message.count("node ") >= 3 and "{CPU: 1}" in message  # the head (0 CPUs) and both workers listed
    check_fits(layout(megatron_split(tmp_path, actor_cpus=0.5), with_ref=False))  # half a CPU per rank fits


def test_tensor_parallel_replicas_get_a_group_each_and_may_land_on_different_nodes(two_nodes, tmp_path: Path) -> None:
    """Megatron DP=2 x TP=2 with 0.45 CPU per rank: 1.8 CPUs could not share one 1-CPU node, but each replica's
    0.9 can, so each replica is its own STRICT_PACK group and the two land on the two nodes."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    cfg = load_config(None, ["train.engine=megatron", "train.tensor_parallel_size=2", "train.data_parallel_size=2",
                             "cluster.colocate=false", "cluster.actor_cpus=0.45", "cluster.rollout_cpus=0",
                             "grpo.kl_coef=0", "reward.workers=0"])
    requests = layout(cfg, with_ref=False)
    assert [(r.name, r.strategy, len(r.bundles)) for r in requests] == [
        ("actor replica 0", "STRICT_PACK", 2), ("actor replica 1", "STRICT_PACK", 2), ("rollout", "PACK", 1),
        ("reward", "PACK", 1)]
    check_fits(requests)
    with pytest.raises(PlacementError, match="actor: its 4 ranks"):  # what one group for all four ranks would ask
        check_fits([GroupRequest("actor", requests[0].bundles * 2, "STRICT_PACK")])
    groups = [placement_group(r.bundles, strategy=r.strategy) for r in requests[:2]]
    try:
        wait_placed(groups, requests[:2], timeout_s=60)
        nodes = [set(placement_group_table(g)["bundles_to_node_id"].values()) for g in groups]
        assert all(len(n) == 1 for n in nodes) and nodes[0] != nodes[1], nodes
        assert ray.available_resources().get("CPU", 0) < 0.25  # both replicas hold their 0.9 CPU
    finally:
        for group in groups:
            remove_placement_group(group)


def test_hsdp_shard_groups_get_a_group_each(two_nodes) -> None:
    """FSDP2 with train.shard_size: each shard group gathers every layer, so each is a STRICT_PACK group (one
    node), ranks 0-1 in the first and 2-3 in the second, as the (replicate, shard) mesh numbers them."""
    cfg = load_config(None, ["train.strategy=fsdp2", "train.data_parallel_size=4", "train.shard_size=2",
                             "cluster.colocate=false", "cluster.actor_cpus=0.45", "cluster.rollout_cpus=0",
                             "grpo.kl_coef=0", "reward.workers=0"])
    requests = layout(cfg, with_ref=False)
    assert [(r.name, r.strategy, len(r.bundles)) for r in requests[:2]] == [
        ("actor replica 0", "STRICT_PACK", 2), ("actor replica 1", "STRICT_PACK", 2)]
    check_fits(requests)  # 0.9 CPU per group: one on each 1-CPU node


def test_role_labels_go_into_each_bundle_and_a_label_no_node_has_names_the_role(two_nodes, tmp_path: Path) -> None:
    cfg = megatron_split(tmp_path, actor_cpus=0.5, actor_resources="{node_a: 0.5}", reward_resources="{node_b: 1}")
    requests = layout(cfg, with_ref=False)
    assert [r.bundles for r in requests] == [[{"CPU": 0.5, "node_a": 0.5}] * 2, [{"CPU": 1e-3}],
                                             [{"CPU": 1e-3, "node_b": 1.0}]]
    check_fits(requests)  # both ranks fit node_a, the scorer node_b
    with pytest.raises(PlacementError) as err:
        check_fits(layout(megatron_split(tmp_path, actor_cpus=0.5, rollout_resources="{gpu_node: 1}"), False))
    message = str(err.value)
    assert "gpu_node: the layout asks for 1 in all, the cluster has 0" in message
    assert "rollout: no node can hold a bundle of {CPU: 0.001, gpu_node: 1}" in message
    assert "cluster.{actor,rollout,ref,reward}_resources" in message


def test_a_group_not_placed_in_time_names_the_waiting_role(two_nodes, tmp_path: Path) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    holder = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="SPREAD")  # another job holds both CPUs
    ray.get(holder.ready(), timeout=60)
    try:
        requests = layout(megatron_split(tmp_path, actor_cpus=0.5), with_ref=False)
        check_fits(requests)  # fits on paper
        groups = [placement_group(r.bundles, strategy=r.strategy) for r in requests]
        start = time.monotonic()
        with pytest.raises(PlacementError) as err:
            wait_placed(groups, requests, timeout_s=3)
        assert time.monotonic() - start < 20
        assert "did not place these roles within 3 s" in str(err.value)
        assert "actor: 2 bundle(s) of {CPU: 0.5} (STRICT_PACK)" in str(err.value)
        assert "free now: {CPU: 0}" in str(err.value) or "free now: {}" in str(err.value)
    finally:
        remove_placement_group(holder)


def test_sft_ranks_reserve_a_bundle_each_and_give_them_back(two_nodes, tiny: str) -> None:
    """An SFT stage's FSDP2 ranks (not colocated) hold one ``cluster.actor_*`` bundle each while the stage runs,
    here one on each 1-CPU node, and give the CPUs back when it ends; a GPU bundle on this CPU-only cluster stops
    before any rank starts, naming the stage."""
    import ray
    from ray.util.placement_group import placement_group_table

    from lingshu_rl.grpo.placement import start_policy_worker

    sets = ["train.strategy=fsdp2", "train.data_parallel_size=2", "train.device=cpu", "cluster.colocate=false",
            "cluster.actor_cpus=1"]
    cfg = load_config(None, sets)
    placed = start_policy_worker(cfg, tiny, cfg.train, 1, True, "lingshu/sft-warmup")
    try:
        assert ray.get(placed.handle.pid.remote()) > 0  # the ranks started (a collective: both of them)
        assert ray.available_resources().get("CPU", 0) == 0
        nodes = {node for g in placed.groups for node in placement_group_table(g)["bundles_to_node_id"].values()}
        assert len(nodes) == 2
    finally:
        placed.shutdown()
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
    with pytest.raises(PlacementError) as err:
        start_policy_worker(load_config(None, [*sets, "cluster.actor_gpus=1"]), tiny, cfg.train, 1, True,
                            "lingshu/sft-warmup")
    assert "cannot place sft-warmup" in str(err.value) and "GPU: the layout asks for 2 in all" in str(err.value)


# --- an existing `ray start --head` cluster: the README's job submission, and a default launch beside it ---------

def readme_commands() -> tuple[list[str], list[str], list[str]]:
    """The `ray get-auth-token`, `ray start --head` and `ray job submit` lines of the README's "On an existing cluster" block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### On an existing cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert lines[0] == "export RAY_AUTH_MODE=token", lines
    token, start, submit = (next(shlex.split(line) for line in lines if line.startswith(prefix))
                            for prefix in ("ray get-auth-token", "ray start --head", "ray job submit"))
    return token, start, submit


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("head")
    ports = {name: free_port("127.0.0.1") for name in ("gcs", "dashboard", "client", "agent", "agent_grpc",
                                                       "metrics", "runtime_env")}
    env = {**os.environ, "HOME": str(root / "home"), "RAY_AUTH_MODE": "token", "LINGSHU_CACHE": str(root / "cache"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    token_cmd, start, submit = readme_commands()
    subprocess.run([str(BIN / "ray"), *token_cmd[1:]], env=env, check=True, capture_output=True, timeout=120)
    head = subprocess.Popen(
        [str(BIN / "ray"), *start[1:], "--block", f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}",
         f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent']}",
         f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--metrics-export-port={ports['metrics']}",
         f"--runtime-env-agent-port={ports['runtime_env']}", f"--temp-dir={root / 'ray'}"],
        env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    token = root / "home" / ".ray" / "auth_token"
    deadline = time.time() + 120
    while not token.is_file() or not _port_open(ports["dashboard"]):
        if head.poll() is not None or time.time() > deadline:
            _kill_group(head.pid)
            pytest.fail("ray start --head did not come up:\n" + head.communicate()[0][-3000:])
        time.sleep(0.5)
    yield {"root": root, "env": env, "ports": ports, "submit": submit, "token": token}
    _kill_group(head.pid, signal.SIGTERM)  # the head and every Ray process it started share its process group
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        _kill_group(head.pid)
        head.wait()
    _kill_group(head.pid)  # what SIGTERM left behind


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_readme_job_submission_runs_on_a_token_authenticated_head(ray_head) -> None:
    out = ray_head["root"] / "job-run"
    submit = [str(BIN / "ray")] + [
        f"http://127.0.0.1:{ray_head['ports']['dashboard']}" if arg == "http://127.0.0.1:8265"
        else str(out) if arg == "/shared/runs/grpo-1" else arg for arg in ray_head["submit"][1:]]
    assert str(out) in submit and f"http://127.0.0.1:{ray_head['ports']['dashboard']}" in submit
    for item in TINY_RUN + ["eval.limit=4"]:
        submit += ["--set", item]
    result = subprocess.run(submit, cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-3000:]
    assert "[lingshu] joined the Ray cluster at auto" in output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]
    # without the token mode in the submitting shell, Ray refuses: the README's `export` is needed
    bare = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address",
                              f"http://127.0.0.1:{ray_head['ports']['dashboard']}"],
                             env=bare, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stdout + refused.stderr


def test_default_launch_beside_a_running_head_starts_its_own_cluster(ray_head, tmp_path: Path) -> None:
    address = f"127.0.0.1:{ray_head['ports']['gcs']}"
    # a short SFT stage is enough: the cluster is chosen before any stage starts
    result = launcher(tmp_path / "own", "sft.stages.0.steps=2", env={"RAY_ADDRESS": address}, timeout=600,
                      stages="sft")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[lingshu] started a local Ray cluster" in result.stdout
    assert f"RAY_ADDRESS={address} is set but was not used: pass --ray-address {address}" in result.stdout
    assert "Connecting to existing Ray cluster" not in result.stdout + result.stderr


def test_dashboard_port_taken_moves_to_a_free_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = launcher(tmp_path / "dash", "cluster.include_dashboard=true", f"cluster.dashboard_port={port}",
                          "sft.stages.0.steps=2", timeout=300, stages="sft")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"port {port} on 127.0.0.1 is taken" in result.stdout
    moved = re.search(r"\[lingshu\] Ray dashboard: http://127\.0\.0\.1:(\d+)", result.stdout)
    assert moved and int(moved.group(1)) != port, result.stdout[-2000:]
