"""GRPO step time: lingshu_rl (transformers or vLLM rollouts) against TRL's GRPOTrainer, and the floors.

    python benchmarks/grpo_step.py                                   # every row, then the table
    python benchmarks/grpo_step.py --rows lingshu-vllm,floor-gen     # some rows
    python benchmarks/grpo_step.py --size small --rows lingshu-vllm,lingshu-vllm-hybrid,lingshu-transformers,\
trl,trl-1t,floor-gen,floor-train                                     # a 38M-parameter model, 128-token responses
    python benchmarks/grpo_step.py --size small --steps 0,1          # smoke run: one measured step per row

One run, same machine, same model, data and settings for every row. ``--size tiny`` (the default): the tiny demo
model (0.9M parameters), 8 prompts x 8 samples per step, up to 32 new tokens, temperature 1.0, one optimiser
update per step (lr 1e-6, all 64 sequences in one forward/backward), KL coefficient 0.04 (so a reference model
runs), reward ``mcq_exact``; the same 88 demo prompts in the same order; 3 warm-up steps, then the median of 8
measured steps; two rounds.

``--size small`` measures the same step where the model's arithmetic, not per-call overhead, sets the time: a
random-init Qwen2 of 38.3M parameters (hidden 384, 24 layers as Qwen2.5-0.5B, 6 query and 2 key/value heads, MLP
1024, untied embeddings, the demo tokenizer's 679-token vocabulary, so every sampled token decodes), 2 prompts x 8
samples per step, every response exactly 128 tokens (lingshu_rl ``rollout.min_new_tokens`` = max, TRL
``generation_kwargs={"min_new_tokens": 128}``, raw vLLM ``min_tokens``: the end-of-turn token cannot end a
response early), all 16 sequences in one forward/backward; 2 warm-up steps (lingshu_rl's first two are slower),
then the median of 5 measured; one round. 16 sequences keep a step at 15-30 s on 2 cores and the seven rows
of the command above at about 17 minutes; the group size stays 8. Decoding 16 sequences on CPU is compute-bound, and
generation does a quarter of the arithmetic per token of the update and reference passes (2 FLOPs per
parameter against 6 + 2), so here training, not generation, is most of lingshu_rl's step (see the phase split).
Every row records the lengths of the responses it produced (mean/min/max) and the table warns if any differ.

Each row runs in a fresh process at niceness 15, the niceness Ray gives its worker processes (where
lingshu_rl's work runs), so that on a shared machine every row competes equally with the other load.
Peak memory: the peak of the summed proportional set size (PSS: each shared page counted once, split between
the processes sharing it) of that process and all its descendants (for lingshu_rl: Ray's own processes, the
actor/reference/rollout workers and the reward workers), sampled every 0.2 s, with each process's share at
that peak; peak RSS (shared pages once per process) beside it.
The floors: raw vLLM generating the same responses (the same engine settings, no training, no Ray), and one
forward+backward of the actor model on the last step's sequences. Each row prints the machine's load average
when it started and ended and how many cores other processes used while it ran; a row that ran loaded is flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from grpo_sizes import (
    SIZES,
    Size,
    build_model,
    describe_model,
    length_stats,
    merge_lengths,
    model_dir,
    print_lengths,
    step_lengths,
)

TEMPERATURE, KL, LR = 1.0, 0.04, 1e-6
RAY_WORKER_NICENESS = 15  # Ray runs its workers at this niceness; every row runs at it (see the module docstring)


# the size of this run (use_size sets them before any row runs, in the driver and in each row's process)
SIZE = SIZES["tiny"]
PROMPTS = N = MAX_NEW = WARMUP = MEASURED = STEPS = 0
OVERRIDES: list[str] = []


def use_size(size: Size) -> None:
    global SIZE, PROMPTS, N, MAX_NEW, WARMUP, MEASURED, STEPS, OVERRIDES
    SIZE, PROMPTS, N, MAX_NEW = size, size.prompts, size.n, size.max_new
    WARMUP, MEASURED, STEPS = size.warmup, size.measured, size.warmup + size.measured
    OVERRIDES = [f"rollout.n={N}", f"rollout.temperature={TEMPERATURE}", f"rollout.max_new_tokens={MAX_NEW}",
                 *([f"rollout.min_new_tokens={size.min_new}"] if size.min_new else []),
                 f"grpo.prompts_per_step={PROMPTS}", f"grpo.kl_coef={KL}", "train.updates_per_step=1",
                 f"train.micro_batch_size={PROMPTS * N}", f"train.lr={LR}", "cluster.include_dashboard=false",
                 "logging.wandb.mode=disabled"]


use_size(SIZE)


# ---- measurement helpers ---------------------------------------------------------------------------------------

class ProcessTreeMonitor:
    """Samples, in a thread, this process and its descendants: the peak of their summed proportional set size
    (PSS: a shared page counts once in all, split between its sharers) and each process's share at that peak,
    the peak of their summed RSS (shared pages once per process), and the CPU time they used, to tell how
    much of the machine other processes took while the row ran (``other_cores``) and, on a virtual machine, its
    host (``steal_cores``)."""

    def __init__(self, every_s: float = 0.2):
        import psutil

        self._root, self._every = psutil.Process(), every_s
        self.peak, self.peak_rss, self.at_peak = 0, 0, {}
        self._cpu: dict[int, float] = {}  # pid -> CPU seconds last seen (processes that exit keep their last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, rss, parts = 0, 0, {}
            for proc in [self._root, *self._root.children(recursive=True)]:
                try:
                    with proc.oneshot():
                        memory, times, name = proc.memory_full_info(), proc.cpu_times(), _process_name(proc)
                except psutil.Error:
                    continue
                total, rss = total + memory.pss, rss + memory.rss
                parts[f"{name} ({proc.pid})"] = memory.pss
                self._cpu[proc.pid] = times.user + times.system
            if total > self.peak:
                self.peak, self.at_peak = total, parts
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self._every)

    def __enter__(self) -> ProcessTreeMonitor:
        import psutil

        times = psutil.cpu_times()
        self._start, self._busy, self._steal = time.perf_counter(), _busy_seconds(times), times.steal
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._start
        times = psutil.cpu_times()
        busy = _busy_seconds(times) - self._busy
        self.other_cores = max(0.0, busy - sum(self._cpu.values())) / wall
        self.steal_cores = (times.steal - self._steal) / wall  # a virtual machine's CPUs taken by its host


def _busy_seconds(times: Any) -> float:
    # guest time is already in user time; steal time is the hypervisor's, not this machine's work
    return sum(times) - times.idle - sum(getattr(times, k, 0.0) for k in ("iowait", "steal", "guest", "guest_nice"))


def _process_name(proc: Any) -> str:
    """Ray names its worker processes ``ray::Class.method`` (or ``ray::IDLE``); others by their program."""
    cmdline = proc.cmdline()
    title = cmdline[0] if cmdline else proc.name()
    return title.split(" ")[0] if title.startswith("ray::") else Path(title).name


def bench_model(workdir: Path) -> tuple[str, Any]:
    """The run's model directory and its tokenizer, in a row's process."""
    from transformers import AutoTokenizer

    path = model_dir(SIZE, workdir)
    return path, AutoTokenizer.from_pretrained(path)


def step_samples() -> list[list[Any]]:
    """The run's demo prompts (tiny: 88, 8 per step), the same for every row."""
    from lingshu_rl.data.demo import make_demo_dataset

    samples = make_demo_dataset(seed=0)[0][:PROMPTS * STEPS]
    return [samples[i:i + PROMPTS] for i in range(0, len(samples), PROMPTS)]


def result(step_s: list[float], memory: ProcessTreeMonitor, **extra: Any) -> dict[str, Any]:
    assert len(step_s) == STEPS, step_s
    return {"step_s": step_s, "median_s": statistics.median(step_s[WARMUP:]), "min_s": min(step_s[WARMUP:]),
            "peak_pss_mb": memory.peak / 2**20, "peak_rss_mb": memory.peak_rss / 2**20,
            "at_peak_mb": {k: v / 2**20 for k, v in sorted(memory.at_peak.items(), key=lambda kv: -kv[1])},
            "other_cores": memory.other_cores, "steal_cores": memory.steal_cores, **extra}


# ---- rows ------------------------------------------------------------------------------------------------------

def row_lingshu(engine: str, workdir: Path, hybrid: bool = False, one_step_off: bool = False) -> dict[str, Any]:
    """The GRPO controller's own steps (``StepLoop``) on a local Ray cluster, as ``train_grpo`` runs them;
    ``hybrid``: actor, reference and rollout engine in one process (``cluster.hybrid``); ``one_step_off``: the next
    step generates while this one scores and updates (``grpo.one_step_off``)."""
    import ray

    from lingshu_rl.config import load_config
    from lingshu_rl.data.chat import encode_prompt
    from lingshu_rl.data.sampler import EpochSampler
    from lingshu_rl.grpo.controller import StepLoop
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.grpo.placement import create_roles
    from lingshu_rl.grpo.rollouts import Prompt
    from lingshu_rl.grpo.sync import WeightSync
    from lingshu_rl.launch.ray_cluster import start_ray
    from lingshu_rl.rewards.combine import build_reward, specs_from_config
    from lingshu_rl.telemetry import PhaseTimer

    lengths = []  # each step's (mean, min, max) response length, from its metrics
    with ProcessTreeMonitor() as memory:
        cfg = load_config(None, [f"rollout.engine={engine}", f"cluster.hybrid={hybrid}",
                                 f"grpo.one_step_off={one_step_off}", *OVERRIDES])
        path, tokenizer = bench_model(workdir)
        prompts = [Prompt(s, encode_prompt(tokenizer, s)) for batch in step_samples() for s in batch]
        start_ray(cfg.cluster, namespace=f"bench-{os.getpid()}")
        roles = create_roles(cfg, path, path, STEPS, build_reward(specs_from_config(["mcq_exact"])),
                             workdir / "reward_workers.log")
        g = cfg.grpo
        loss = GRPOLoss(g.clip_low, g.clip_high, g.kl_coef, g.kl_estimator, g.loss_agg, g.entropy_coef,
                        cfg.rollout.temperature, cfg.rollout.tis_cap)
        step_s, phases, timer = [], [], PhaseTimer()
        loop = None
        try:
            loop = StepLoop(cfg, roles, EpochSampler(prompts, 0, shuffle=False), loss, ["mcq_exact"],
                            tokenizer.pad_token_id, timer, WeightSync(roles, cfg, path))
            for step in range(1, STEPS + 1):
                timer.reset()
                metrics, _ = loop.run(step, STEPS)
                lengths.append(tuple(metrics[f"response/length_{k}"] for k in ("mean", "min", "max")))
                timing = timer.metrics()
                step_s.append(timing["timing/step_s"])
                phases.append({**timing, "logprob_abs_diff": metrics.get("rollout/logprob_abs_diff")})
        finally:
            if loop is not None:
                loop.close()
            roles.shutdown()
            ray.shutdown()
    return result(step_s, memory, phases=phases, **length_stats(lengths, STEPS * PROMPTS * N))


def row_trl(use_vllm: bool, workdir: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer on CPU; step time = between consecutive ``on_step_end`` callbacks (the whole loop)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lingshu_rl.rewards.base import call_reward
    from lingshu_rl.rewards.combine import build_reward, specs_from_config

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.lengths: list[tuple[float, int, int]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):  # one generation per step, logged each step
            if logs and "completions/mean_length" in logs:
                self.lengths.append(tuple(logs[f"completions/{k}_length"] for k in ("mean", "min", "max")))

    with ProcessTreeMonitor() as memory:
        path, tokenizer = bench_model(workdir)
        samples = [s for batch in step_samples() for s in batch]
        by_id = {s.id: s for s in samples}
        mcq = build_reward(specs_from_config(["mcq_exact"]))

        def mcq_exact(prompts, completions, id, **_):  # the same reward function, called the same way
            return [call_reward(mcq, c[-1]["content"], by_id[i].answer, by_id[i].reward_fields()).score
                    for c, i in zip(completions, id)]

        data = Dataset.from_list([{"prompt": [m for m in s.messages if m["role"] != "assistant"], "id": s.id}
                                  for s in samples])
        args = GRPOConfig(
            output_dir=str(workdir / "trl"), use_cpu=True, seed=0, per_device_train_batch_size=PROMPTS * N,
            gradient_accumulation_steps=1, num_generations=N, max_completion_length=MAX_NEW,
            temperature=TEMPERATURE, beta=KL, learning_rate=LR, max_steps=STEPS, shuffle_dataset=False,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, bf16=False,
            model_init_kwargs={"dtype": torch.float32}, dataloader_num_workers=0,
            gradient_checkpointing=False,  # TRL's GRPO default is True; lingshu_rl does not recompute activations
            **({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3} if use_vllm else {}),
            # the end-of-turn token masked before min_new tokens: GenerationConfig's / vLLM SamplingParams' name
            **({"generation_kwargs": {"min_tokens" if use_vllm else "min_new_tokens": SIZE.min_new}}
               if SIZE.min_new else {}))
        clock = StepClock()
        trainer = GRPOTrainer(model=path, reward_funcs=[mcq_exact], args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[clock])
        trainer.train()
    return result([b - a for a, b in zip(clock.marks, clock.marks[1:])], memory,
                  **length_stats(clock.lengths, STEPS * PROMPTS * N))


def row_floor_gen(workdir: Path) -> dict[str, Any]:
    """Raw ``vllm.LLM.generate`` (the run's n, temperature and lengths) with the engine lingshu_rl builds; saves the
    last step's sequences for the training floor."""
    import vllm

    from lingshu_rl.data.chat import encode_prompt
    from lingshu_rl.rollout.vllm_engine import VLLMRollout

    with ProcessTreeMonitor() as memory:
        path, tokenizer = bench_model(workdir)
        engine = VLLMRollout(path, tokenizer)
        params = vllm.SamplingParams(n=N, temperature=TEMPERATURE, max_tokens=MAX_NEW, min_tokens=SIZE.min_new,
                                     stop_token_ids=engine.eos_ids)
        step_s, sequences, lengths = [], [], []
        for batch in step_samples():
            prompts = [encode_prompt(tokenizer, s) for s in batch]
            start = time.perf_counter()
            outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            step_s.append(time.perf_counter() - start)
            sequences = [[p, list(o.token_ids)] for p, out in zip(prompts, outputs) for o in out.outputs]
            lengths.append(step_lengths([len(r) for _, r in sequences]))
    (workdir / "sequences.json").write_text(json.dumps(sequences))
    tokens = sum(len(r) for _, r in sequences)
    return result(step_s, memory, tokens_last_step=tokens, **length_stats(lengths, STEPS * PROMPTS * N))


def row_floor_train(workdir: Path) -> dict[str, Any]:
    """One forward+backward of the actor model on the last step's sequences of ``floor-gen`` (no optimiser, no
    Ray)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lingshu_rl.train.batch import collate
    from lingshu_rl.train.logprob import token_logprobs

    with ProcessTreeMonitor() as memory:
        path, tokenizer = bench_model(workdir)
        sequences = json.loads((workdir / "sequences.json").read_text())
        batch = collate([p for p, _ in sequences], [r for _, r in sequences], tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.config.use_cache = False
        model.train()
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        step_s = []
        for _ in range(STEPS):
            start = time.perf_counter()
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=positions).logits
            logprobs = token_logprobs(logits, batch.input_ids, TEMPERATURE)
            (-(logprobs * batch.response_mask).sum() / batch.response_mask.sum()).backward()
            model.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - start)
    return result(step_s, memory, **length_stats([step_lengths([len(r) for _, r in sequences])], len(sequences)))


# name: (label, row, extra environment). Ray starts worker processes with OMP_NUM_THREADS=1 and lingshu_rl then
# sets torch's threads per role (colocated roles take turns, each with every core; vLLM one thread); the floors
# run at their faster setting (vLLM one thread, training every core), and "trl-1t" shows TRL with one thread.
ROWS: dict[str, tuple[str, Callable[[Path], dict[str, Any]], dict[str, str]]] = {
    "lingshu-transformers": ("lingshu_rl + transformers rollout", lambda w: row_lingshu("transformers", w), {}),
    "lingshu-vllm": ("lingshu_rl + vLLM rollout", lambda w: row_lingshu("vllm", w), {}),
    "lingshu-vllm-hybrid": ("lingshu_rl + vLLM, cluster.hybrid (one process)", lambda w: row_lingshu("vllm", w, True),
                            {}),
    "lingshu-vllm-overlap": ("lingshu_rl + vLLM, grpo.one_step_off", lambda w: row_lingshu("vllm", w, False, True),
                             {}),
    "trl": ("TRL GRPOTrainer (CPU, transformers generate)", lambda w: row_trl(False, w), {}),
    "trl-1t": ("TRL GRPOTrainer (CPU), OMP_NUM_THREADS=1", lambda w: row_trl(False, w), {"OMP_NUM_THREADS": "1"}),
    "trl-vllm": ("TRL GRPOTrainer + vLLM colocate (CPU)", lambda w: row_trl(True, w), {}),
    "floor-gen": ("floor: vLLM alone, {seqs} responses", row_floor_gen, {"OMP_NUM_THREADS": "1"}),
    "floor-train": ("floor: actor forward+backward, {seqs} seqs", row_floor_train, {}),
}


# ---- driver ----------------------------------------------------------------------------------------------------

def label(name: str) -> str:
    return ROWS[name][0].format(seqs=PROMPTS * N)


def run_row(name: str, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one row in a fresh process; a failure becomes the row's ``error`` (its last output lines)."""
    out = workdir / f"{name}.json"
    log = workdir / f"{name}.log"
    load = os.getloadavg()[0]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", **ROWS[name][2]}
    with open(log, "w") as sink:
        try:
            proc = subprocess.run([sys.executable, __file__, "--row", name, "--workdir", str(workdir), "--size",
                                   SIZE.name, "--steps", f"{WARMUP},{MEASURED}"], env=env,
                                  stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code == 0 and out.is_file():
        return {**json.loads(out.read_text()), "load": (load, os.getloadavg()[0])}
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return {"error": f"exit {code}: " + " | ".join(tail)[-600:], "load": (load, os.getloadavg()[0])}


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's rounds as one: medians over every round's measured steps, the worst peak and load."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return runs[0]
    measured = [s for r in done for s in r["step_s"][WARMUP:]]
    return {**done[0], "median_s": statistics.median(measured), "min_s": min(measured),
            "peak_pss_mb": max(r["peak_pss_mb"] for r in done), "peak_rss_mb": max(r["peak_rss_mb"] for r in done),
            "at_peak_mb": max(done, key=lambda r: r["peak_pss_mb"])["at_peak_mb"],
            "other_cores": max(r["other_cores"] for r in done), "steal_cores": max(r["steal_cores"] for r in done),
            "load": (runs[0]["load"][0], runs[-1]["load"][1]), "rounds": len(done),
            "phases": [p for r in done for p in r.get("phases", [])[WARMUP:]] if "phases" in done[0] else None,
            "lengths": merge_lengths([r["lengths"] for r in done])}


LOADED_CORES = 0.2  # other processes using more than this many cores while a row ran: the row ran loaded


def print_table(results: dict[str, dict[str, Any]], model: str) -> None:
    trl_rows = {n: r["median_s"] for n, r in results.items() if n.startswith("trl") and "median_s" in r}
    best_trl = min(trl_rows.values()) if trl_rows else None
    new = f"<= {MAX_NEW}" if SIZE.min_new == 0 else f"exactly {MAX_NEW}" if SIZE.min_new == MAX_NEW \
        else f"{SIZE.min_new}-{MAX_NEW}"
    print(f"\nGRPO step: {PROMPTS} prompts x {N} samples, {new} new tokens, T={TEMPERATURE}, KL {KL}, "
          f"1 update/step; per round {WARMUP} warm-up steps, then {MEASURED} measured; medians over the rounds; "
          f"{os.cpu_count()} CPU cores\nmodel ({SIZE.name}): {model}\n")
    print(f"| {'row':<46} | {'median s/step':>13} | {'min s/step':>10} | {'peak PSS MB':>11} | {'peak RSS MB':>11} "
          f"| {'x best TRL':>10} | {'load avg':>9} | {'other cores':>11} | {'steal cores':>11} |")
    print(f"|{'-' * 48}|{'-' * 14}:|{'-' * 11}:|{'-' * 12}:|{'-' * 12}:|{'-' * 11}:|{'-' * 10}:|{'-' * 12}:"
          f"|{'-' * 12}:|")
    for name, r in results.items():
        load = "{:.1f}-{:.1f}".format(*r["load"])
        if "error" in r:
            print(f"| {label(name):<46} | {'did not run':>13} | {'':>10} | {'':>11} | {'':>11} | {'':>10} | {load:>9} "
                  f"| {'':>11} | {'':>11} |")
            continue
        ratio = f"{r['median_s'] / best_trl:.2f}" if best_trl else "n/a"
        print(f"| {label(name):<46} | {r['median_s']:>13.3f} | {r['min_s']:>10.3f} | {r['peak_pss_mb']:>11,.0f} "
              f"| {r['peak_rss_mb']:>11,.0f} | {ratio:>10} | {load:>9} | {r['other_cores']:>11.2f} "
              f"| {r['steal_cores']:>11.2f} |")
    loaded = [n for n, r in results.items() if r.get("other_cores", 0.0) + r.get("steal_cores", 0.0) > LOADED_CORES]
    if loaded:
        print(f"\nWARNING: ran loaded (other processes or the host took more than {LOADED_CORES} cores meanwhile): "
              + ", ".join(f"{n} ({results[n]['other_cores'] + results[n]['steal_cores']:.2f})" for n in loaded)
              + ". Compare with care.")
    print_lengths(SIZE, {label(n): r["lengths"] for n, r in results.items() if "error" not in r})
    for name, r in results.items():
        if "error" in r:
            print(f"\n{label(name)} did not run: {r['error']}")
    for name, r in results.items():
        if not r.get("phases"):
            continue
        measured = r["phases"]
        keys = [k for k in measured[0] if k.startswith("timing/") and k != "timing/step_s"]
        for p in measured:  # driver time outside the phases (batching, metrics, Ray calls not waited on)
            p["timing/other_s"] = p["timing/step_s"] - sum(p.get(k, 0.0) for k in keys)
        parts = {k[len("timing/"):-2]: statistics.median(p.get(k, 0.0) for p in measured)
                 for k in [*keys, "timing/other_s"]}
        print(f"\n{label(name)}, median seconds per phase: "
              + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
        diff = [p["logprob_abs_diff"] for p in measured if p.get("logprob_abs_diff") is not None]
        if diff:
            print(f"  rollout vs training log-prob mean |diff|: {statistics.median(diff):.2e}")
        floor = results.get("floor-gen", {}).get("median_s")
        if name.startswith("lingshu-vllm") and floor:
            print(f"  generation phase / vLLM-alone floor: {parts['gen'] / floor:.2f}x by medians")
        if best_trl:
            print(f"  step / TRL's best row: {r['median_s'] / best_trl:.2f}x")
        print("  peak PSS by process (MB): " + ", ".join(f"{k} {v:,.0f}" for k, v in r["at_peak_mb"].items()
                                                          if v >= 20))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--timeout-s", type=float, default=1200, help="per row")
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="model and batch (module docstring)")
    parser.add_argument("--rounds", type=int, help="runs of every row, interleaved; medians over all (default: "
                        + ", ".join(f"{k} {v.rounds}" for k, v in SIZES.items()) + ")")
    parser.add_argument("--steps", help="WARMUP,MEASURED steps per row and round (default: "
                        + ", ".join(f"{k} {v.warmup},{v.measured}" for k, v in SIZES.items())
                        + "); e.g. 0,1 for a smoke run")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SIZES[args.size]
    if args.steps:
        warmup, measured = (int(x) for x in args.steps.split(","))
        if warmup < 0 or measured < 1:
            parser.error("--steps: WARMUP >= 0, MEASURED >= 1")
        size = replace(size, warmup=warmup, measured=measured)
    use_size(size)
    if args.row:
        os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        out = ROWS[args.row][1](args.workdir)
        (args.workdir / f"{args.row}.json").write_text(json.dumps(out))
        return 0
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if "floor-train" in names and "floor-gen" not in names:
        names.insert(names.index("floor-train"), "floor-gen")  # the training floor uses its sequences
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="grpo-step-") as tmp:
        model = describe_model(SIZE, build_model(SIZE, Path(tmp)))
        print(f"[bench] size {SIZE.name}: {model}", flush=True)
        rounds = args.rounds or SIZE.rounds
        for round_ in range(1, rounds + 1):  # rows interleaved: a slow spell of the machine hits them all
            for name in names:
                print(f"[bench] round {round_}: {name} ...", flush=True)
                r = run_row(name, Path(tmp), args.timeout_s)
                runs[name].append(r)
                steps = r["error"] if "error" in r else f"steps {[round(s, 2) for s in r['step_s']]}"
                print(f"[bench] round {round_}: {name}: {steps}", flush=True)
    print_table({name: merge_rounds(rows) for name, rows in runs.items()}, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
