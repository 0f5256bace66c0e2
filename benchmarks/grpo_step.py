"""GRPO step time: lingshu_rl (transformers or vLLM rollouts) against TRL's GRPOTrainer, and the floors.

    python benchmarks/grpo_step.py                                   # every row, then the table
    python benchmarks/grpo_step.py --rows lingshu-vllm,floor-gen     # some rows

One run, same machine, tiny default model, same data and settings for every row: 8 prompts x 8 samples per
step, up to 32 new tokens, temperature 1.0, one optimiser update per step (lr 1e-6, all 64 sequences in one
forward/backward), KL coefficient 0.04 (so a reference model runs), reward ``mcq_exact``; the same 48 demo
prompts in the same order; 1 warm-up step, then the median of 5 measured steps.

Each row runs in a fresh process at niceness 15, the niceness Ray gives its worker processes (where
lingshu_rl's work runs), so that on a shared machine every row competes equally with the other load.
Peak memory: the peak of the summed resident set of that process and all its descendants (for lingshu_rl:
Ray's own processes, the actor/reference/rollout workers and the reward workers), sampled every 0.2 s;
shared pages count once per process, so multi-process rows are overstated.
The floors: raw vLLM generating the same 64 responses (the same engine settings, no training, no Ray), and one
forward+backward of the actor model on 64 such sequences. The machine's load average is printed with the table:
on a shared machine compare rows of one run, not runs.
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
from pathlib import Path
from typing import Any

PROMPTS, N, MAX_NEW, TEMPERATURE, KL, LR = 8, 8, 32, 1.0, 0.04, 1e-6
WARMUP, MEASURED = 1, 5
RAY_WORKER_NICENESS = 15  # Ray runs its workers at this niceness; every row runs at it (see the module docstring)
STEPS = WARMUP + MEASURED
OVERRIDES = [f"rollout.n={N}", f"rollout.temperature={TEMPERATURE}", f"rollout.max_new_tokens={MAX_NEW}",
             f"grpo.prompts_per_step={PROMPTS}", f"grpo.kl_coef={KL}", "train.updates_per_step=1",
             f"train.micro_batch_size={PROMPTS * N}", f"train.lr={LR}", "cluster.include_dashboard=false",
             "logging.wandb.mode=disabled"]


# ---- measurement helpers ---------------------------------------------------------------------------------------

class PeakMemory:
    """Peak of the summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, every_s: float = 0.2):
        import psutil

        self._root, self._every, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in [self._root, *self._root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self._every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tiny_model() -> tuple[str, Any]:
    from transformers import AutoTokenizer

    from lingshu_rl.models.tiny import build_tiny_model

    path = str(build_tiny_model())
    return path, AutoTokenizer.from_pretrained(path)


def step_samples() -> list[list[Any]]:
    """The 48 demo prompts of the run, 8 per step, the same for every row."""
    from lingshu_rl.data.demo import make_demo_dataset

    samples = make_demo_dataset(seed=0)[0][:PROMPTS * STEPS]
    return [samples[i:i + PROMPTS] for i in range(0, len(samples), PROMPTS)]


def result(step_s: list[float], memory: PeakMemory, **extra: Any) -> dict[str, Any]:
    assert len(step_s) == STEPS, step_s
    return {"step_s": step_s, "median_s": statistics.median(step_s[WARMUP:]), "min_s": min(step_s[WARMUP:]),
            "peak_rss_mb": memory.peak / 2**20, **extra}


# ---- rows ------------------------------------------------------------------------------------------------------

def row_lingshu(engine: str, workdir: Path) -> dict[str, Any]:
    """The GRPO controller's own step (``grpo_step``) on a local Ray cluster, as ``train_grpo`` runs it."""
    import ray

    from lingshu_rl.config import load_config
    from lingshu_rl.data.chat import encode_prompt
    from lingshu_rl.grpo.controller import Prompt, grpo_step
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.grpo.placement import create_roles
    from lingshu_rl.grpo.sync import WeightSync
    from lingshu_rl.launch.ray_cluster import start_ray
    from lingshu_rl.rewards.combine import build_reward, specs_from_config
    from lingshu_rl.telemetry import PhaseTimer

    with PeakMemory() as memory:
        cfg = load_config(None, [f"rollout.engine={engine}", *OVERRIDES])
        path, tokenizer = tiny_model()
        steps = [[Prompt(s, encode_prompt(tokenizer, s)) for s in batch] for batch in step_samples()]
        start_ray(cfg.cluster, namespace=f"bench-{os.getpid()}")
        roles = create_roles(cfg, path, path, STEPS, build_reward(specs_from_config(["mcq_exact"])),
                             workdir / "reward_workers.log")
        g = cfg.grpo
        loss = GRPOLoss(g.clip_low, g.clip_high, g.kl_coef, g.kl_estimator, g.loss_agg, g.entropy_coef,
                        cfg.rollout.temperature, cfg.rollout.tis_cap)
        step_s, phases, timer = [], [], PhaseTimer()
        try:
            weights = WeightSync(roles, cfg, path)
            assert roles.reward is not None
            for step, prompts in enumerate(steps, start=1):
                timer.reset()
                metrics, _ = grpo_step(step, prompts, roles, roles.reward, cfg, loss, ["mcq_exact"],
                                       tokenizer.pad_token_id, timer, weights)
                timing = timer.metrics()
                step_s.append(timing["timing/step_s"])
                phases.append({**timing, "logprob_abs_diff": metrics.get("rollout/logprob_abs_diff")})
        finally:
            roles.shutdown()
            ray.shutdown()
    return result(step_s, memory, phases=phases)


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

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    with PeakMemory() as memory:
        path, tokenizer = tiny_model()
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
            **({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3} if use_vllm else {}))
        clock = StepClock()
        trainer = GRPOTrainer(model=path, reward_funcs=[mcq_exact], args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[clock])
        trainer.train()
    return result([b - a for a, b in zip(clock.marks, clock.marks[1:])], memory)


def row_floor_gen(workdir: Path) -> dict[str, Any]:
    """Raw ``vllm.LLM.generate`` (n=8, temperature 1, <= 32 tokens) with the engine lingshu_rl builds; saves the
    last step's 64 sequences for the training floor."""
    import vllm

    from lingshu_rl.data.chat import encode_prompt
    from lingshu_rl.rollout.vllm_engine import VLLMRollout

    with PeakMemory() as memory:
        path, tokenizer = tiny_model()
        engine = VLLMRollout(path, tokenizer)
        params = vllm.SamplingParams(n=N, temperature=TEMPERATURE, max_tokens=MAX_NEW, stop_token_ids=engine.eos_ids)
        step_s, sequences = [], []
        for batch in step_samples():
            prompts = [encode_prompt(tokenizer, s) for s in batch]
            start = time.perf_counter()
            outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            step_s.append(time.perf_counter() - start)
            sequences = [[p, list(o.token_ids)] for p, out in zip(prompts, outputs) for o in out.outputs]
    (workdir / "sequences.json").write_text(json.dumps(sequences))
    tokens = sum(len(r) for _, r in sequences)
    return result(step_s, memory, tokens_last_step=tokens)


def row_floor_train(workdir: Path) -> dict[str, Any]:
    """One forward+backward of the actor model on the 64 sequences of ``floor-gen`` (no optimiser, no Ray)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lingshu_rl.train.batch import collate
    from lingshu_rl.train.logprob import token_logprobs

    with PeakMemory() as memory:
        path, tokenizer = tiny_model()
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
    return result(step_s, memory)


# name: (label, row, extra environment). Ray starts worker processes with OMP_NUM_THREADS=1 and lingshu_rl then
# sets torch's threads per role; the floors run with OMP_NUM_THREADS=1 (one torch thread: the fastest setting
# on a busy 2-core machine, where 2 threads spin against other processes), and "trl-1t" shows TRL with it too,
# since on a shared machine the thread setting can matter more than the framework.
ROWS: dict[str, tuple[str, Callable[[Path], dict[str, Any]], dict[str, str]]] = {
    "lingshu-transformers": ("lingshu_rl + transformers rollout", lambda w: row_lingshu("transformers", w), {}),
    "lingshu-vllm": ("lingshu_rl + vLLM rollout", lambda w: row_lingshu("vllm", w), {}),
    "trl": ("TRL GRPOTrainer (CPU, transformers generate)", lambda w: row_trl(False, w), {}),
    "trl-1t": ("TRL GRPOTrainer (CPU), OMP_NUM_THREADS=1", lambda w: row_trl(False, w), {"OMP_NUM_THREADS": "1"}),
    "trl-vllm": ("TRL GRPOTrainer + vLLM colocate (CPU)", lambda w: row_trl(True, w), {}),
    "floor-gen": ("floor: vLLM alone, 64 responses", row_floor_gen, {"OMP_NUM_THREADS": "1"}),
    "floor-train": ("floor: actor forward+backward, 64 seqs", row_floor_train, {"OMP_NUM_THREADS": "1"}),
}


# ---- driver ----------------------------------------------------------------------------------------------------

def run_row(name: str, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one row in a fresh process; a failure becomes the row's ``error`` (its last output lines)."""
    out = workdir / f"{name}.json"
    log = workdir / f"{name}.log"
    load = os.getloadavg()[0]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", **ROWS[name][2]}
    with open(log, "w") as sink:
        try:
            proc = subprocess.run([sys.executable, __file__, "--row", name, "--workdir", str(workdir)], env=env,
                                  stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code == 0 and out.is_file():
        return {**json.loads(out.read_text()), "load": (load, os.getloadavg()[0])}
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return {"error": f"exit {code}: " + " | ".join(tail)[-600:], "load": (load, os.getloadavg()[0])}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    trl = results.get("trl", {}).get("median_s")
    print(f"\nGRPO step: {PROMPTS} prompts x {N} samples, <= {MAX_NEW} new tokens, T={TEMPERATURE}, KL {KL}, "
          f"1 update/step; median of {MEASURED} steps after {WARMUP} warm-up; {os.cpu_count()} CPU cores\n")
    print(f"| {'row':<46} | {'median s/step':>13} | {'min s/step':>10} | {'peak RSS MB':>11} | {'x TRL':>6} "
          f"| {'load avg':>9} |")
    print(f"|{'-' * 48}|{'-' * 14}:|{'-' * 11}:|{'-' * 12}:|{'-' * 7}:|{'-' * 10}:|")
    for name, r in results.items():
        label = ROWS[name][0]
        load = "{:.1f}-{:.1f}".format(*r["load"])
        if "error" in r:
            print(f"| {label:<46} | {'did not run':>13} | {'':>10} | {'':>11} | {'':>6} | {load:>9} |")
            continue
        ratio = f"{r['median_s'] / trl:.2f}" if trl else "n/a"
        print(f"| {label:<46} | {r['median_s']:>13.3f} | {r['min_s']:>10.3f} | {r['peak_rss_mb']:>11,.0f} "
              f"| {ratio:>6} | {load:>9} |")
    for name, r in results.items():
        if "error" in r:
            print(f"\n{ROWS[name][0]} did not run: {r['error']}")
    for name, r in results.items():
        if "phases" not in r:
            continue
        measured = r["phases"][WARMUP:]
        keys = [k for k in measured[0] if k.startswith("timing/") and k != "timing/step_s"]
        for p in measured:  # driver time outside the phases (batching, metrics, Ray calls not waited on)
            p["timing/other_s"] = p["timing/step_s"] - sum(p.get(k, 0.0) for k in keys)
        parts = {k[len("timing/"):-2]: statistics.median(p.get(k, 0.0) for p in measured)
                 for k in [*keys, "timing/other_s"]}
        print(f"\n{ROWS[name][0]}, median seconds per phase: "
              + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
        diff = [p["logprob_abs_diff"] for p in measured if p.get("logprob_abs_diff") is not None]
        if diff:
            print(f"  rollout vs training log-prob mean |diff|: {statistics.median(diff):.2e}")
        floor = results.get("floor-gen", {}).get("median_s")
        if name == "lingshu-vllm" and floor:
            best = min(p["timing/gen_s"] for p in measured) / results["floor-gen"]["min_s"]
            print(f"  generation phase / vLLM-alone floor: {parts['gen'] / floor:.2f}x by medians, {best:.2f}x by "
                  "minima (goal <= 1.3x)")
        if name == "lingshu-vllm" and trl:
            print(f"  step / TRL step: {r['median_s'] / trl:.2f}x (goal <= 0.5x)")
        one_thread = results.get("trl-1t", {}).get("median_s")
        if name == "lingshu-vllm" and one_thread:
            print(f"  step / TRL step with OMP_NUM_THREADS=1: {r['median_s'] / one_thread:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--timeout-s", type=float, default=1200, help="per row")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
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
    results = {}
    with tempfile.TemporaryDirectory(prefix="grpo-step-") as tmp:
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            results[name] = run_row(name, Path(tmp), args.timeout_s)
            r = results[name]
            steps = r["error"] if "error" in r else f"steps {[round(s, 2) for s in r['step_s']]}"
            print(f"[bench] {name}: {steps}", flush=True)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
