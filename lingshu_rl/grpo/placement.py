"""All Ray placement: the layout of the roles, its check against the cluster, placement groups, named actors.

Colocated (one machine, the default): the roles share one placement-group bundle (one device) and each
gets a fraction of it. Not colocated (a cluster): each role gets its own placement group, with one bundle
per rollout worker, sized by the ``cluster.*_cpus`` / ``*_gpus`` settings and labelled by the
``cluster.*_resources`` custom resources (which pin a role to the nodes that have them).

The reward scorer is a role too (:class:`~lingshu_rl.rewards.remote.RewardActor`, its sandboxed processes beside
it): colocated, in the shared bundle with no CPUs of its own; else in a group of one bundle of
``reward.workers`` CPUs, so that a driver or a CPU-less head node never scores.

With ``train.strategy: fsdp2`` (``train.data_parallel_size`` ranks) or ``train.engine: megatron``
(``train.tensor_parallel_size`` ranks) the actor (and the reference) is a group of rank actors
(:class:`~lingshu_rl.train.group.PolicyGroup`, driven like one worker): colocated, the ranks split the role's
share; not colocated, one ``actor_*``/``ref_*``-sized bundle per rank (give each ``actor_gpus: 1``): FSDP2's ranks in
one placement group, which may spread over nodes; megatron's in one STRICT_PACK group per tensor-parallel replica
(a TP group talks every layer: one node), the replicas free to land on different nodes.

An SFT stage's policy (:func:`start_policy_worker`) reserves what the GRPO actor would, in placement groups of its
own that it gives back when the stage ends.

A layout the cluster cannot hold stops before any actor starts (:func:`check_fits`), and a group Ray does not
place within ``cluster.placement_timeout_s`` stops with the role it waits for: never a silent hang.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lingshu_rl.config import ClusterConfig, RunConfig, TrainConfig
from lingshu_rl.grpo.failures import Placed, get_or_die, record_nodes
from lingshu_rl.grpo.workers import Facet, HybridWorker, PolicyWorker, RolloutWorker
from lingshu_rl.rewards.base import RewardFn
from lingshu_rl.rewards.pool import ScoredBatch, ScoreItem
from lingshu_rl.rewards.remote import RewardActor, reward_payload
from lingshu_rl.rewards.sandbox import Limits
from lingshu_rl.train.group import PolicyGroup, group_sizes, is_group, kill_policy, terminate_policy

ACTOR, ROLLOUT, REF, REWARD = "lingshu/actor-0", "lingshu/rollout-{}", "lingshu/ref-0", "lingshu/reward-0"
ROLES = ("actor", "rollout", "ref", "reward")


@dataclass
class RewardScorer:
    """The driver's handle on the scoring actor (:meth:`RewardPool.score` in its process): chunks submitted as
    they are generated, collected as one batch."""

    actor: Any  # RewardActor handle

    def submit(self, items: Sequence[ScoreItem]) -> ray.ObjectRef:
        """Start scoring ``items`` (the actor scores submissions in order); :meth:`collect` the results."""
        return self.actor.score.remote(list(items))

    def collect(self, submitted: Sequence[ray.ObjectRef]) -> ScoredBatch:
        """The scores of consecutive submissions, as one batch."""
        return ScoredBatch.concat(get_or_die(list(submitted), REWARD))


@dataclass
class Roles:
    actor: Any  # ray.actor.ActorHandle of PolicyWorker
    rollouts: list[Any]  # RolloutWorker handles
    ref: Any | None  # PolicyWorker handle (frozen), None when the KL coefficient is 0
    groups: list[PlacementGroup]
    reward: RewardScorer | None = None  # None: the caller scores by other means
    placed: list[Placed] = field(default_factory=list)  # where every actor (every rank) runs
    hybrid: Any | None = None  # cluster.hybrid: the HybridWorker behind the actor, ref and rollout facets

    def names(self) -> dict[str, Any]:
        named = {ACTOR: self.actor, **{ROLLOUT.format(i): h for i, h in enumerate(self.rollouts)}}
        if self.ref is not None:
            named[REF] = self.ref
        if self.reward is not None:
            named[REWARD] = self.reward.actor
        return named

    def shutdown(self) -> None:
        # graceful: each worker finishes its queue and exits; then the groups (which would kill them) go
        if self.reward is not None:  # its sandboxed processes first
            self.reward.actor.close.remote()
        handles = {id(h): h for h in (h.handle if isinstance(h, Facet) else h for h in self.names().values())}
        _stop(list(handles.values()), self.groups)


def _stop(handles: list[Any], groups: list[PlacementGroup]) -> None:
    """Graceful: each worker (or group of ranks) finishes its queue and exits; then the placement groups (which
    would kill them) go."""
    exits = [ref for handle in handles for ref in terminate_policy(handle)]
    ray.wait(exits, num_returns=len(exits), timeout=30)
    for group in groups:
        remove_placement_group(group)


def _threads(cfg: ClusterConfig, cpus: float) -> int:
    """Torch threads for a role: colocated roles take turns on the whole machine; others use their share."""
    if cfg.colocate:
        return int(cfg.num_cpus or os.cpu_count() or 1)
    return max(1, int(cpus))


class PlacementError(RuntimeError):
    """The role layout cannot be placed on this cluster (or was not placed in time); the message says why."""


@dataclass
class GroupRequest:
    """One placement group the layout asks for."""

    role: str  # "actor", "rollout", "ref", "reward", or "actor+rollout+ref" when colocated
    bundles: list[dict[str, float]]
    strategy: str  # "PACK" or "STRICT_PACK" (all bundles on one node)
    replica: int | None = None  # megatron's data-parallel replicas: one STRICT_PACK group each

    @property
    def name(self) -> str:
        return self.role if self.replica is None else f"{self.role} replica {self.replica}"

    def describe(self) -> str:
        kinds = sorted({_fmt(b) for b in self.bundles})
        return f"{self.name}: {len(self.bundles)} bundle(s) of {' / '.join(kinds)} ({self.strategy})"


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _policy_ranks(cfg: RunConfig) -> int:
    dp, tp = group_sizes(cfg.train)
    return dp * tp


def layout(cfg: RunConfig, with_ref: bool) -> list[GroupRequest]:
    """The placement groups GRPO's roles ask for (checked by :func:`check_fits`, created by :func:`create_roles`)."""
    c = cfg.cluster
    if c.colocate:  # one bundle for every role: it carries all their labels
        labels: dict[str, float] = {}
        for extra in (c.actor_resources, c.rollout_resources, c.ref_resources, c.reward_resources):
            labels.update({k: max(v, labels.get(k, 0.0)) for k, v in extra.items()})
        return [GroupRequest("actor+rollout" + ("+ref" if with_ref else ""),
                             [_bundle(c.actor_cpus, c.actor_gpus, labels)], "PACK")]
    requests = [*_policy_requests("actor", cfg.train, _bundle(c.actor_cpus, c.actor_gpus, c.actor_resources)),
                GroupRequest("rollout", [_bundle(c.rollout_cpus, c.rollout_gpus, c.rollout_resources)]
                             * cfg.rollout.num_workers, "PACK")]
    if with_ref:
        requests += _policy_requests("ref", cfg.train, _bundle(c.ref_cpus, c.ref_gpus, c.ref_resources))
    # the scorer's sandboxed processes are its CPUs; reward.workers=0 scores in the actor itself
    requests.append(GroupRequest("reward", [_bundle(cfg.reward.workers, 0, c.reward_resources)], "PACK"))
    return requests


def _check_ranks_on_gpus(c: ClusterConfig, ranks: int) -> None:
    if c.colocate and ranks > 1 and c.actor_gpus:
        raise ValueError("a policy of several ranks (train.tensor_parallel_size or train.data_parallel_size > 1) on "
                         "GPUs needs cluster.colocate=false (one GPU per rank)")


def _bundle(cpus: float, gpus: float, labels: dict[str, float]) -> dict[str, float]:
    # Ray refuses a bundle of zeros: keep a sliver
    return {"CPU": cpus if cpus or gpus else 1e-3, **({"GPU": gpus} if gpus else {}), **labels}


def _policy_requests(role: str, train_cfg: TrainConfig, rank: dict[str, float]) -> list[GroupRequest]:
    """A policy role's groups, one ``rank`` bundle per rank (not colocated)."""
    dp, tp = group_sizes(train_cfg)
    # a tensor-parallel group talks every layer: one node per replica; so does an HSDP shard group (it gathers
    # every layer); FSDP's data-parallel ranks may spread over nodes
    if tp > 1:
        return [GroupRequest(role, [rank] * tp, "STRICT_PACK", i if dp > 1 else None) for i in range(dp)]
    if 0 < train_cfg.shard_size < dp:
        shard = train_cfg.shard_size
        return [GroupRequest(role, [rank] * shard, "STRICT_PACK", i) for i in range(dp // shard)]
    return [GroupRequest(role, [rank] * dp, "PACK")]


def _rank_slot(role_groups: list[tuple[PlacementGroup, GroupRequest]], rank: int) -> tuple[PlacementGroup, int]:
    """Where rank ``rank`` of a policy role goes (not colocated): bundle r of the role's group, or with one group
    per tensor-parallel replica (HSDP shard group) of k ranks, bundle r % k of group r // k."""
    per_group = len(role_groups[0][1].bundles)
    return role_groups[rank // per_group][0], rank % per_group


def _rank_options(name: str, slot: tuple[PlacementGroup, int, dict[str, float]], ranks: int,
                  role_groups: list[tuple[PlacementGroup, GroupRequest]] | None) -> Callable[[int], dict[str, Any]]:
    """Ray options of each rank of a policy role. Colocated (``role_groups`` None): the ranks split ``slot``'s
    resources in its bundle; else rank r holds one bundle's worth, in the bundle :func:`_rank_slot` gives it."""
    group, index, resources = slot
    share = ranks if role_groups is None else 1

    def options(rank: int) -> dict[str, Any]:
        where = (group, index) if role_groups is None else _rank_slot(role_groups, rank)
        return {"name": name if rank == 0 else f"{name}/rank{rank}", "max_restarts": 0,
                "num_cpus": resources.get("CPU", 0) / share, "num_gpus": resources.get("GPU", 0) / share,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(*where)}

    return options


def _start_policy(cfg: RunConfig, train_cfg: TrainConfig, rank_options: Callable[[int], dict[str, Any]], path: str,
                  total_steps: int, trainable: bool, threads: int) -> Any:
    """A ``PolicyWorker`` actor, or a :class:`PolicyGroup` of ranks (FSDP2, megatron) placed by ``rank_options``;
    colocated ranks split ``threads``."""
    if not is_group(train_cfg):
        return ray.remote(PolicyWorker).options(**rank_options(0)).remote(
            path, cfg.model, train_cfg, total_steps, trainable, cfg.seed, threads)
    dp, tp = group_sizes(train_cfg)
    return PolicyGroup.start(rank_options, path, cfg.model, train_cfg, total_steps, trainable, cfg.seed,
                             max(1, threads // (dp * tp)) if cfg.cluster.colocate else threads)


def _place(requests: list[GroupRequest], timeout_s: float, what: str = "the GRPO roles") -> list[PlacementGroup]:
    """Check ``requests`` against the cluster, create their placement groups and wait until Ray has placed them."""
    check_fits(requests, what)
    groups = [placement_group(r.bundles, strategy=r.strategy) for r in requests]
    wait_placed(groups, requests, timeout_s)
    return groups


def _node_resources() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


def _sum(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for b in bundles:
        for k, v in b.items():
            total[k] += v
    return dict(total)


def check_fits(requests: list[GroupRequest], what: str = "the GRPO roles") -> None:
    """Raise :class:`PlacementError` if the cluster cannot hold ``requests`` at all: the resources in total, each
    bundle on some node, each STRICT_PACK group on one node. (Whether they are free now is :func:`wait_placed`'s.)"""
    nodes = _node_resources()
    keys = sorted({k for r in requests for b in r.bundles for k in b})
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}
    problems = []
    for key, amount in _sum([b for r in requests for b in r.bundles]).items():
        if amount > totals[key] + 1e-9:
            problems.append(f"{key}: the layout asks for {amount:g} in all, the cluster has {totals[key]:g}")
    for r in requests:
        if r.strategy == "STRICT_PACK" and not any(_fits(_sum(r.bundles), n) for n in nodes):
            problems.append(f"{r.name}: its {len(r.bundles)} ranks ({_fmt(_sum(r.bundles))}) must share one node "
                            "(STRICT_PACK) and no node has that much")
        elif unplaceable := [b for b in r.bundles if not any(_fits(b, n) for n in nodes)]:
            problems.append(f"{r.name}: no node can hold a bundle of {_fmt(unplaceable[0])}")
    if not problems:
        return
    per_node = "\n".join(f"    node {i}: {_fmt({k: n.get(k, 0.0) for k in keys})}" for i, n in enumerate(nodes))
    raise PlacementError(
        f"this cluster cannot place {what}:\n  - " + "\n  - ".join(problems)
        + "\n  requested:\n" + "".join(f"    {r.describe()}\n" for r in requests)
        + f"  cluster: {_fmt(totals)} on {len(nodes)} node(s):\n{per_node}\n"
        + "  change: cluster.colocate=true (one shared bundle), the cluster.{actor,rollout,ref}_{cpus,gpus} sizes, "
          "the cluster.{actor,rollout,ref,reward}_resources labels (a node must have them: ray start --resources), "
          "rollout.num_workers, reward.workers, train.tensor_parallel_size; or give the cluster more "
          "(cluster.num_cpus for a local one, more nodes for a real one)")


def wait_placed(groups: list[PlacementGroup], requests: list[GroupRequest], timeout_s: float) -> None:
    """Wait until Ray has placed every group; past ``timeout_s`` remove them all and name what is pending."""
    ready = {g.ready(): r for g, r in zip(groups, requests)}
    _, pending = ray.wait(list(ready), num_returns=len(ready), timeout=timeout_s)
    if not pending:
        return
    for group in groups:
        remove_placement_group(group)
    waiting = "\n".join(f"    {ready[ref].describe()}" for ref in pending)
    raise PlacementError(
        f"Ray did not place these roles within {timeout_s:g} s (cluster.placement_timeout_s):\n{waiting}\n"
        f"  free now: {_fmt({k: v for k, v in ray.available_resources().items() if k in ('CPU', 'GPU')})}; "
        "the cluster has room on paper, so other actors or jobs probably hold the resources")


def create_roles(cfg: RunConfig, policy_path: str, ref_path: str | None, total_steps: int,
                 reward: RewardFn | None = None, reward_log: Path | None = None) -> Roles:
    """Start the actor and rollout workers from ``policy_path``, when ``ref_path`` is given the frozen reference
    worker from it, and when ``reward`` is given the scoring actor (its processes print to ``reward_log``)."""
    with_ref = ref_path is not None
    c = cfg.cluster
    num_rollouts = cfg.rollout.num_workers
    ranks = _policy_ranks(cfg)
    _check_ranks_on_gpus(c, ranks)
    requests = layout(cfg, with_ref)
    groups = _place(requests, c.placement_timeout_s)
    if c.colocate:
        group, bundle = groups[0], requests[0].bundles[0]
        share = {k: v / (1 + num_rollouts + int(with_ref)) for k, v in bundle.items()}
        slots = {"actor": (group, 0, share), "ref": (group, 0, share), "reward": (group, 0, {}),
                 **{f"rollout{i}": (group, 0, share) for i in range(num_rollouts)}}
    else:
        of_role = {role: [(g, r) for g, r in zip(groups, requests) if r.role == role] for role in ROLES}
        slots = {"actor": (of_role["actor"][0][0], 0, of_role["actor"][0][1].bundles[0]),
                 **{f"rollout{i}": (of_role["rollout"][0][0], i, of_role["rollout"][0][1].bundles[i])
                    for i in range(num_rollouts)},
                 "reward": (of_role["reward"][0][0], 0, of_role["reward"][0][1].bundles[0])}
        if with_ref:
            slots["ref"] = (of_role["ref"][0][0], 0, of_role["ref"][0][1].bundles[0])

    def options(slot: str, name: str) -> dict[str, Any]:
        group, index, resources = slots[slot]
        return {"name": name, "num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0),
                "max_restarts": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, index)}

    def policy(slot: str, name: str, path: str, trainable: bool, threads: int) -> Any:
        rank_options = _rank_options(name, slots[slot], ranks, None if c.colocate else of_role[slot])
        return _start_policy(cfg, cfg.train, rank_options, path, total_steps, trainable, threads)

    device = cfg.train.device
    started: list[Any] = []
    hybrid: Any = None
    rollouts: list[Any]  # worker handles, or with cluster.hybrid the hybrid worker's facets (actor and ref too)
    try:
        if c.hybrid:  # one process for the three roles, with the bundle's shares of all three
            hybrid = _start_hybrid(cfg, options("actor", ACTOR), 2 + int(with_ref), policy_path, ref_path, total_steps)
            started.append(hybrid)
            actor, rollouts = Facet(hybrid, "actor"), [Facet(hybrid, "rollout")]
            ref = Facet(hybrid, "ref") if ref_path is not None else None
        else:
            actor = policy("actor", ACTOR, policy_path, True, _threads(c, c.actor_cpus))
            started.append(actor)
            rollouts = [ray.remote(RolloutWorker).options(**options(f"rollout{i}", ROLLOUT.format(i))).remote(
                policy_path, cfg.model, cfg.rollout, device, _threads(c, c.rollout_cpus))
                for i in range(num_rollouts)]
            started += rollouts
            ref = policy("ref", REF, ref_path, False, _threads(c, c.ref_cpus)) if ref_path is not None else None
            if ref is not None:
                started.append(ref)
        scorer = None if reward is None else RewardScorer(start_reward_actor(cfg, reward, reward_log, options))
    except Exception as err:  # a group of ranks starts synchronously (the scorer's reward must pickle): clean up
        for handle in started:
            kill_policy(handle)
        for group in groups:
            remove_placement_group(group)
        raise RuntimeError(f"a worker failed to start: {err}") from None
    return _record_nodes(Roles(actor, rollouts, ref, groups, scorer, hybrid=hybrid))


def _start_hybrid(cfg: RunConfig, options: dict[str, Any], roles: int, policy_path: str, ref_path: str | None,
                  total_steps: int) -> Any:
    """``cluster.hybrid``: one :class:`HybridWorker` with the resources of ``roles`` roles."""
    options = {**options, "num_cpus": options["num_cpus"] * roles, "num_gpus": options["num_gpus"] * roles}
    return ray.remote(HybridWorker).options(**options).remote(
        policy_path, ref_path, cfg.model, cfg.train, cfg.rollout, total_steps, cfg.seed, cfg.train.device,
        _threads(cfg.cluster, cfg.cluster.actor_cpus))


def _record_nodes(roles: Roles) -> Roles:
    """``roles`` with where each of its actors runs; a worker that failed to start stops here, named."""
    actors = {}  # every actor, each rank of a group under its own name
    for role, handle in roles.names().items():
        ranks_of = handle.ranks if isinstance(handle, PolicyGroup) else [handle]
        actors.update({role if r == 0 else f"{role}/rank{r}": (role, h) for r, h in enumerate(ranks_of)})
    try:  # surfaces start-up errors now, naming the worker
        roles.placed = record_nodes(actors)
    except RuntimeError:
        roles.shutdown()
        raise
    return roles


def start_reward_actor(cfg: RunConfig, reward: RewardFn, log_path: Path | None,
                       options: Callable[[str, str], dict[str, Any]]) -> Any:
    """The scoring actor (:class:`RewardActor`) in its slot: ``options(slot, name)`` gives its Ray options."""
    r = cfg.reward
    limits = Limits(r.memory_limit_mb, r.cpu_limit_s, r.max_processes, r.file_limit_mb, tuple(r.env_allow))
    return ray.remote(RewardActor).options(**options("reward", REWARD)).remote(
        reward_payload(reward), r.workers, r.timeout_s, r.failure_score, limits,
        None if log_path is None else str(log_path))


def start_policy_worker(cfg: RunConfig, model_path: str, train_cfg: TrainConfig, total_steps: int, trainable: bool,
                        name: str) -> StageWorker:
    """A policy outside the GRPO roles (an SFT stage), reserving what the GRPO actor would: colocated, one bundle of
    ``cluster.actor_{cpus,gpus}`` (the ranks of a group split it); else one such bundle per rank, laid out as the
    actor's (:func:`layout`). A ``PolicyWorker`` actor, or a group of ranks (FSDP2, megatron). End it with
    :meth:`StageWorker.shutdown`, which gives the placement groups back."""
    c = cfg.cluster
    dp, tp = group_sizes(train_cfg)
    ranks = dp * tp
    rank_bundle = _bundle(c.actor_cpus, c.actor_gpus, c.actor_resources)
    _check_ranks_on_gpus(c, ranks)
    role = name.removeprefix("lingshu/")
    requests = ([GroupRequest(role, [rank_bundle], "PACK")] if c.colocate
                else _policy_requests(role, train_cfg, rank_bundle))
    groups = _place(requests, c.placement_timeout_s, what=role)
    rank_options = _rank_options(name, (groups[0], 0, rank_bundle), ranks,
                                 None if c.colocate else list(zip(groups, requests)))
    try:
        handle = _start_policy(cfg, train_cfg, rank_options, model_path, total_steps, trainable,
                               _threads(c, c.actor_cpus))
    except BaseException:
        for group in groups:
            remove_placement_group(group)
        raise
    return StageWorker(handle, groups)


@dataclass
class StageWorker:
    """A policy started by :func:`start_policy_worker` and the placement groups that hold its resources."""

    handle: Any  # a PolicyWorker actor or a PolicyGroup
    groups: list[PlacementGroup]

    def shutdown(self) -> None:
        """Let the worker finish its queue and exit, then give its resources back (the next stage needs them)."""
        _stop([self.handle], self.groups)
