"""All Ray placement: starting or joining the cluster, placement groups, and the named role actors.

Colocated (one machine, the default): the roles share one placement-group bundle (one device) and each
gets a fraction of it. Not colocated (a cluster): each role gets its own placement group, with one bundle
per rollout worker, sized by the ``cluster.*_cpus`` / ``*_gpus`` settings.

With ``train.engine: megatron`` the actor (and the reference) is a group of ``train.tensor_parallel_size`` rank
actors (:class:`~lingshu_rl.train.megatron.group.MegatronGroup`, driven like one worker): colocated, the ranks
split the role's share; not colocated, the role's placement group has one ``actor_*``/``ref_*``-sized bundle
per rank (give each ``actor_gpus: 1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lingshu_rl.config import ClusterConfig, RunConfig
from lingshu_rl.grpo.workers import PolicyWorker, RolloutWorker
from lingshu_rl.telemetry import ray_init_options
from lingshu_rl.train.megatron.group import MegatronGroup, kill_policy, terminate_policy

ACTOR, ROLLOUT, REF = "lingshu/actor-0", "lingshu/rollout-{}", "lingshu/ref-0"


def start_ray(cfg: ClusterConfig, namespace: str) -> dict[str, Any]:
    """Join ``cfg.address`` or start a local cluster whose dashboard listens on ``cfg.dashboard_host`` only."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine unless asked
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}}
    if cfg.address:
        context = ray.init(address=cfg.address, namespace=namespace, runtime_env=env, log_to_driver=True)
    else:
        context = ray.init(num_cpus=cfg.num_cpus, namespace=namespace, runtime_env=env,
                           **ray_init_options(cfg.dashboard_host, cfg.dashboard_port, cfg.metrics_export_port,
                                              cfg.include_dashboard))
    return {"dashboard_url": getattr(context, "dashboard_url", None)}


@dataclass
class Roles:
    actor: Any  # ray.actor.ActorHandle of PolicyWorker
    rollouts: list[Any]  # RolloutWorker handles
    ref: Any | None  # PolicyWorker handle (frozen), None when the KL coefficient is 0
    groups: list[PlacementGroup]

    def names(self) -> dict[str, Any]:
        named = {ACTOR: self.actor, **{ROLLOUT.format(i): h for i, h in enumerate(self.rollouts)}}
        if self.ref is not None:
            named[REF] = self.ref
        return named

    def shutdown(self) -> None:
        # graceful: each worker finishes its queue and exits; then the groups (which would kill them) go
        exits = [ref for handle in self.names().values() for ref in terminate_policy(handle)]
        ray.wait(exits, num_returns=len(exits), timeout=30)
        for group in self.groups:
            remove_placement_group(group)


def _threads(cfg: ClusterConfig, cpus: float) -> int:
    """Torch threads for a role: colocated roles take turns on the whole machine; others use their share."""
    if cfg.colocate:
        return int(cfg.num_cpus or os.cpu_count() or 1)
    return max(1, int(cpus))


def create_roles(cfg: RunConfig, policy_path: str, ref_path: str | None, total_steps: int) -> Roles:
    """Start the actor and rollout workers from ``policy_path`` and, when ``ref_path`` is given, the frozen
    reference worker from it."""
    with_ref = ref_path is not None
    c = cfg.cluster
    num_rollouts = cfg.rollout.num_workers
    role_count = 1 + num_rollouts + int(with_ref)
    tp = cfg.train.tensor_parallel_size if cfg.train.engine == "megatron" else 1  # ranks per policy role
    if c.colocate and tp > 1 and c.actor_gpus:
        raise ValueError("train.tensor_parallel_size > 1 on GPUs needs cluster.colocate=false (one GPU per rank)")
    if c.colocate:
        bundle = {"CPU": max(c.actor_cpus, 1e-3), **({"GPU": c.actor_gpus} if c.actor_gpus else {})}
        group = placement_group([bundle], strategy="PACK")
        groups = [group]
        share = {k: v / role_count for k, v in bundle.items()}
        slots = {"actor": (group, 0, share), "ref": (group, 0, share),
                 **{f"rollout{i}": (group, 0, share) for i in range(num_rollouts)}}
    else:
        actor_g = placement_group([{"CPU": c.actor_cpus, **({"GPU": c.actor_gpus} if c.actor_gpus else {})}] * tp,
                                  strategy="PACK")
        rollout_bundle = {"CPU": c.rollout_cpus, **({"GPU": c.rollout_gpus} if c.rollout_gpus else {})}
        rollout_g = placement_group([rollout_bundle] * num_rollouts, strategy="PACK")
        groups = [actor_g, rollout_g]
        slots = {"actor": (actor_g, 0, actor_g.bundle_specs[0]),
                 **{f"rollout{i}": (rollout_g, i, rollout_bundle) for i in range(num_rollouts)}}
        if with_ref:
            ref_g = placement_group([{"CPU": c.ref_cpus, **({"GPU": c.ref_gpus} if c.ref_gpus else {})}] * tp,
                                    strategy="PACK")
            groups.append(ref_g)
            slots["ref"] = (ref_g, 0, ref_g.bundle_specs[0])
    ray.get([g.ready() for g in groups], timeout=600)

    def options(slot: str, name: str) -> dict[str, Any]:
        group, index, resources = slots[slot]
        return {"name": name, "num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0),
                "max_restarts": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, index)}

    def policy(slot: str, name: str, path: str, trainable: bool, threads: int) -> Any:
        if cfg.train.engine != "megatron":
            return ray.remote(PolicyWorker).options(**options(slot, name)).remote(
                path, cfg.model, cfg.train, total_steps, trainable, cfg.seed, threads)

        def rank_options(rank: int) -> dict[str, Any]:  # colocated: the ranks split the share; else bundle r
            opts = options(slot, name if rank == 0 else f"{name}/tp{rank}")
            if c.colocate:
                opts.update(num_cpus=opts["num_cpus"] / tp, num_gpus=opts["num_gpus"] / tp)
            else:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(slots[slot][0], rank)
            return opts

        return MegatronGroup.start(tp, rank_options, path, cfg.model, cfg.train, total_steps, trainable, cfg.seed,
                                   max(1, threads // tp) if c.colocate else threads)

    device = cfg.train.device
    started: list[Any] = []
    try:
        actor = policy("actor", ACTOR, policy_path, True, _threads(c, c.actor_cpus))
        started.append(actor)
        rollouts = [ray.remote(RolloutWorker).options(**options(f"rollout{i}", ROLLOUT.format(i))).remote(
            policy_path, cfg.model, cfg.rollout, device, _threads(c, c.rollout_cpus)) for i in range(num_rollouts)]
        started += rollouts
        ref = policy("ref", REF, ref_path, False, _threads(c, c.ref_cpus)) if with_ref else None
    except Exception as err:  # a megatron group starts synchronously: clean up what did start
        for handle in started:
            kill_policy(handle)
        for group in groups:
            remove_placement_group(group)
        raise RuntimeError(f"a policy worker failed to start: {err}") from None
    roles = Roles(actor, rollouts, ref, groups)
    for name, handle in roles.names().items():  # surface start-up errors now, naming the role
        try:
            ray.get(handle.pid.remote())
        except ray.exceptions.RayError as err:
            roles.shutdown()
            raise RuntimeError(f"the worker {name!r} failed to start: {err}") from None
    return roles


def start_policy_worker(cfg: RunConfig, model_path: str, train_cfg: Any, total_steps: int, trainable: bool,
                        name: str, threads: int) -> Any:
    """A lone policy worker outside the GRPO roles (the SFT stages): a ``PolicyWorker`` actor, or a megatron
    group with its ranks sharing this worker's (zero) CPU reservation. End it with :func:`kill_policy`."""
    opts = {"name": name, "num_cpus": 0, "max_restarts": 0}
    if train_cfg.engine != "megatron":
        return ray.remote(PolicyWorker).options(**opts).remote(model_path, cfg.model, train_cfg, total_steps,
                                                                trainable, cfg.seed, threads)
    tp = train_cfg.tensor_parallel_size
    return MegatronGroup.start(tp, lambda r: {**opts, "name": name if r == 0 else f"{name}/tp{r}"}, model_path,
                               cfg.model, train_cfg, total_steps, trainable, cfg.seed, max(1, threads // tp))
