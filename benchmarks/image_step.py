"""The multimodal demo's GRPO step before and after the lean image path, from one run on one machine.

    python benchmarks/image_step.py                          # SFT warm-up once, then before and after, 8 steps each
    python benchmarks/image_step.py --rounds 2               # before, after, before, after
    python benchmarks/image_step.py --sft-from /tmp/image_step-x/sft-run   # reuse an earlier run's SFT warm-up
    python benchmarks/image_step.py --steps 3                # smoke run: both variants to the end, 1 measured step

The lean image path landed in two commits: 89ad36e (GRPO images prepared once per prompt in Ray tasks, pixels
fetched from the object store by the rollout workers and training ranks, never held by the driver) and 3d04a2e
(shared prompts: a GRPO group's prompt, text and images, runs once per micro-batch). "before" is the tree of
``89ad36e^`` (extracted with ``git archive``; the repository is only read); "after" is this working tree,
uncommitted changes included.

Each variant runs the launcher as a user would, in a fresh process with ``PYTHONPATH=<its tree>`` and its working
directory in a temporary folder (the repository is pip-installed editable, but setuptools' editable finder comes
after ``PYTHONPATH`` on the import path, and Ray puts the driver's working directory on its workers' path, so the
working directory must not be the repository; each variant checks which tree ``import lingshu_rl`` resolves to,
and, in every process of its run, Ray's workers included, that the first ``PYTHONPATH`` entry holding a
``lingshu_rl`` package is its tree):

    python -m lingshu_rl.launch --preset demo-vl --reward mcq_exact --stages grpo --output-dir OUT \\
        --set grpo.steps=K --set cluster.include_dashboard=false --set logging.wandb.mode=disabled

The demo's GRPO starts from its SFT warm-up (110 steps). ``--stages grpo`` needs that stage's output in the run
directory, so the warm-up runs once, with this tree (``--stages sft``), and its ``sft/`` folder is copied into every
variant's output directory: both variants start GRPO from the same weights (``--sft-from`` reuses an earlier
warm-up; ``--no-sft`` starts GRPO from the random base model instead, ``sft.stages=[]``, not the demo's workload).
Only config keys that exist in both trees are passed (the old tree rejects unknown keys); the seed and every other
setting are the preset's. The tiny model and the images are built once, before any variant runs, into a
``LINGSHU_CACHE`` that every run shares (their builders are the same in both trees).

Figures per variant (from OUTPUT_DIR/metrics.jsonl, written the same way by both trees): the median of
``timing/step_s`` over the steps after the first ``--skip`` (2), the median of each phase both trees time
(``timing/gen_s``, ``score``, ``old``, ``ref``, ``update``, ``sync``), the mean response length and reward (the
work each variant did), and the peak of the summed proportional set size (PSS: each shared page counted once,
split between its sharers) of the launcher's process and all its descendants (Ray's own processes, the actor,
reference, rollout and reward workers, the image tasks' workers), sampled every 0.2 s, with each process's share at
the peak, and how many processes the run started (after the lean path, the image tasks run in Ray workers of their
own, started during the first step: one reason to leave the first steps out). The machine's load average is
printed when each variant starts and ends; with ``--rounds N`` the variants alternate (before, after, before,
after, ...) and the table gives each round and the medians over all rounds' measured steps.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "89ad36e^"  # the parent of "GRPO images prepared once per prompt in Ray tasks ..."
PHASES = ("gen", "score", "old", "ref", "update", "sync")  # timed by both trees' controllers, in step order
SFT_STAGE = "warmup"  # demo-vl.yaml's one SFT stage
LAUNCH = [sys.executable, "-m", "lingshu_rl.launch", "--preset", "demo-vl", "--reward", "mcq_exact"]
# keys present in both trees' config.py (the old tree rejects e.g. train.share_prompts, cluster.hybrid,
# grpo.one_step_off, rollout.min_new_tokens)
COMMON_SETS = ["cluster.include_dashboard=false", "logging.wandb.mode=disabled"]


# ---- the trees ---------------------------------------------------------------------------------------------------

def git(*args: str) -> str:
    # --no-optional-locks: git status does not rewrite the index (the repository is only read)
    return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def extract(commit: str, dest: Path) -> None:
    """``git archive <commit> | tar -x -C dest``: the commit's tree, the repository left as it is."""
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")


def after_label() -> str:
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "lingshu_rl")
                 or git("ls-files", "--others", "--exclude-standard", "--", "lingshu_rl"))
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted" if dirty else "")


def variant_env(tree: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)  # exactly the tree: nothing else of the caller's path comes before it
    env["LINGSHU_CACHE"] = str(cache)
    env.pop("RAY_ADDRESS", None)
    return env


def check_import(tree: Path, env: dict[str, str], cwd: Path) -> str:
    """The file ``import lingshu_rl`` resolves to in a variant's process; it must be inside the variant's tree."""
    out = subprocess.run([sys.executable, "-c", "import lingshu_rl; print(lingshu_rl.__file__)"], env=env, cwd=cwd,
                         check=True, capture_output=True, text=True).stdout.strip()
    if Path(out).resolve() != (tree / "lingshu_rl" / "__init__.py").resolve():
        raise SystemExit(f"PYTHONPATH={tree} imports lingshu_rl from {out}, not from its own tree")
    return out


# ---- memory of a process tree --------------------------------------------------------------------------------------

class TreeMemory:
    """Samples, in a thread, process ``pid`` and all its descendants every ``every_s``: the peak of their summed PSS
    and each process's share at that peak; also the ``PYTHONPATH`` each process inherited (seen once per process).

    (benchmarks/grpo_step.py's ProcessTreeMonitor does the same for the process it runs in; here the launcher is
    a child process, so the tree's root is its pid.)"""

    def __init__(self, pid: int, every_s: float = 0.2):
        import psutil

        self._root, self._every = psutil.Process(pid), every_s
        self.peak, self.at_peak, self.samples = 0, {}, 0
        self.pythonpath: dict[int, tuple[str, str | None]] = {}  # pid -> (name, PYTHONPATH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, parts = 0, {}
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:  # the launcher has exited
                break
            for proc in procs:
                try:
                    with proc.oneshot():
                        pss, name = proc.memory_full_info().pss, proc.name()
                        if proc.pid not in self.pythonpath:
                            self.pythonpath[proc.pid] = (name, proc.environ().get("PYTHONPATH"))
                except psutil.Error:
                    continue
                total += pss
                parts[f"{name} ({proc.pid})"] = pss
            self.samples += 1
            if total > self.peak:
                self.peak, self.at_peak = total, parts
            self._stop.wait(self._every)

    def start(self) -> TreeMemory:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def descendants(self) -> list[int]:
        import psutil

        try:
            return [p.pid for p in self._root.children(recursive=True)]
        except psutil.Error:
            return []


# ---- running the launcher ------------------------------------------------------------------------------------------

def first_package(pythonpath: str) -> Path | None:
    """The first entry of ``pythonpath`` that holds a ``lingshu_rl`` package (what ``import lingshu_rl`` finds)."""
    for entry in pythonpath.split(os.pathsep):
        if entry and (Path(entry) / "lingshu_rl" / "__init__.py").is_file():
            return Path(entry).resolve()
    return None


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def launch(args: list[str], env: dict[str, str], cwd: Path, log: Path, timeout_s: float,
           monitor: bool = False) -> tuple[int, float, TreeMemory | None]:
    """Run the launcher with ``args``; returns its exit status, its wall time and (``monitor``) its memory."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([*LAUNCH, *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a timeout ends it and only it
        memory = TreeMemory(proc.pid).start() if monitor else None
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"  timed out after {timeout_s:.0f} s: stopping the launcher (pid {proc.pid}) and its processes")
            stragglers = memory.descendants() if memory else []
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in stragglers:  # Ray's processes that left the launcher's process group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            code = -1
    if memory:
        memory.stop()
    return code, time.perf_counter() - start, memory


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def prebuild(tree: Path, env: dict[str, str], cwd: Path) -> None:
    """Build the tiny model and the demo's images into LINGSHU_CACHE: the launcher's own ``prepare`` (no cluster)."""
    code = ("import sys; from lingshu_rl.launch.cli import build_parser, prepare; "
            "prepare(build_parser().parse_args(sys.argv[1:]))")
    out = cwd / "prebuild-out"
    subprocess.run([sys.executable, "-c", code, "--preset", "demo-vl", "--reward", "mcq_exact", "--stages", "grpo",
                    "--output-dir", str(out)], env=env, cwd=cwd, check=True)
    shutil.rmtree(out, ignore_errors=True)


def run_sft(env: dict[str, str], cwd: Path, out: Path, timeout_s: float) -> Path:
    print(f"SFT warm-up (once, for every variant): {out}  [load {load()}]", flush=True)
    code, wall, _ = launch(["--stages", "sft", "--output-dir", str(out), *sum((["--set", s] for s in COMMON_SETS), [])],
                           env, cwd, out.parent / "sft.log", timeout_s)
    if code != 0:
        raise SystemExit(f"the SFT warm-up failed (exit {code}):\n{tail(out.parent / 'sft.log')}")
    print(f"  done in {wall:.0f} s  [load {load()}]; reuse it with --sft-from {out}", flush=True)
    return out


def sft_output(run_dir: Path) -> Path:
    folder = run_dir / "sft" / SFT_STAGE
    if not (folder / "done.json").is_file():
        raise SystemExit(f"{run_dir} holds no finished SFT stage {SFT_STAGE!r} ({folder}/done.json)")
    return folder


def run_variant(name: str, tree: Path, label: str, env: dict[str, str], cwd: Path, workdir: Path, steps: int,
                skip: int, sft_from: Path | None, timeout_s: float) -> dict[str, Any]:
    out = workdir / "out"
    out.mkdir(parents=True)
    sets = [*COMMON_SETS, f"grpo.steps={steps}"]
    if sft_from is None:
        sets.append("sft.stages=[]")
    else:
        shutil.copytree(sft_output(sft_from), out / "sft" / SFT_STAGE)
    args = ["--stages", "grpo", "--output-dir", str(out), *sum((["--set", s] for s in sets), [])]
    start_load = load()
    print(f"{name} ({label}): {' '.join(['python -m lingshu_rl.launch', *LAUNCH[3:], *args])}\n"
          f"  PYTHONPATH={tree}  cwd={cwd}  [load {start_load}]", flush=True)
    code, wall, memory = launch(args, env, cwd, workdir / "launch.log", timeout_s, monitor=True)
    end_load = load()
    assert memory is not None
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); log {workdir / 'launch.log'}:\n{tail(workdir / 'launch.log')}")
    rows = sorted((json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()),
                  key=lambda r: r.get("step", 0))
    rows = [r for r in rows if "timing/step_s" in r]
    if len(rows) != steps:
        raise SystemExit(f"{name}: {len(rows)} GRPO steps with timing/step_s in {out / 'metrics.jsonl'}, not {steps}")
    measured = rows[skip:]
    # in every process of the tree, the first PYTHONPATH entry that holds a lingshu_rl package must be this tree
    # (Ray's workers get the driver's working directory and Ray's own folders first, then the driver's sys.path)
    paths = {p for _, p in memory.pythonpath.values()}
    foreign = sorted(p for p in paths if p is not None and first_package(p) != tree.resolve())
    started = collections.Counter(name for name, _ in memory.pythonpath.values())
    result = {
        "variant": name, "label": label, "tree": str(tree), "wall_s": wall, "load": (start_load, end_load),
        "step_s": [r["timing/step_s"] for r in measured],
        "phases": {p: [r[f"timing/{p}_s"] for r in measured if f"timing/{p}_s" in r] for p in PHASES},
        "length": statistics.mean(r["response/length_mean"] for r in measured),
        "reward": statistics.mean(r["reward/mean"] for r in measured),
        "peak_pss": memory.peak, "at_peak": memory.at_peak, "samples": memory.samples,
        "processes": len(memory.pythonpath), "started": dict(started), "pythonpaths": sorted(p or "-" for p in paths),
        "foreign": foreign,
    }
    top = sorted(memory.at_peak.items(), key=lambda kv: -kv[1])[:6]
    print(f"  done in {wall:.0f} s  [load {end_load}]: median {statistics.median(result['step_s']):.3f} s/step over "
          f"{len(measured)} steps, peak PSS {memory.peak / 2**20:,.0f} MB ({memory.samples} samples; at the peak: "
          + ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in top) + ")", flush=True)
    print(f"  {len(memory.pythonpath)} processes seen over the run (by the name they had when first seen: "
          + ", ".join(f"{k} {v}" for k, v in started.most_common()) + ")", flush=True)
    print(f"  every process's PYTHONPATH finds lingshu_rl first in {tree}" if not foreign else
          f"  WARNING: processes whose PYTHONPATH finds lingshu_rl elsewhere first: {foreign}", flush=True)
    return result


# ---- the table -----------------------------------------------------------------------------------------------------

def print_table(results: list[dict[str, Any]], rounds: int) -> None:
    phases = [p for p in PHASES if all(r["phases"][p] for r in results)]  # timed by both trees in this run
    head = ["variant", "commit", "round", "measured steps", "median s/step", *(f"{p} s" for p in phases),
            "peak PSS MB", "processes", "resp len", "reward", "wall s", "load start-end"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 3 + ["--:"] * (len(head) - 4) + ["---"]) + "|")

    def row(name: str, label: str, rnd: str, part: list[dict[str, Any]]) -> None:
        step_s = [s for r in part for s in r["step_s"]]
        cells = [name, label, rnd, str(len(step_s)), f"**{statistics.median(step_s):.3f}**",
                 *(f"{statistics.median([v for r in part for v in r['phases'][p]]):.3f}" for p in phases),
                 f"{max(r['peak_pss'] for r in part) / 2**20:,.0f}", "/".join(str(r["processes"]) for r in part),
                 f"{statistics.mean(r['length'] for r in part):.1f}",
                 f"{statistics.mean(r['reward'] for r in part):.3f}",
                 f"{statistics.mean(r['wall_s'] for r in part):.0f}",
                 ", ".join(f"{r['load'][0].split('/')[0]}-{r['load'][1].split('/')[0]}" for r in part)]
        print("| " + " | ".join(cells) + " |")

    names = list(dict.fromkeys(r["variant"] for r in results))
    for name in names:
        mine = [r for r in results if r["variant"] == name]
        for i, r in enumerate(mine, 1):
            row(name, r["label"], str(i), [r])
        if rounds > 1:
            row(name, mine[0]["label"], "all", mine)
    if len(names) == 2:
        before, after = ([r for r in results if r["variant"] == n] for n in names)
        t0 = statistics.median([s for r in before for s in r["step_s"]])
        t1 = statistics.median([s for r in after for s in r["step_s"]])
        m0, m1 = max(r["peak_pss"] for r in before), max(r["peak_pss"] for r in after)
        print(f"\n{names[1]} / {names[0]}: step time {t1 / t0:.2f}x, peak PSS {m1 / m0:.2f}x "
              f"(peak PSS: the largest over the rounds)")


# ---- main ----------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per variant (default 8)")
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the medians (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, variants interleaved (default 1)")
    parser.add_argument("--before", default=BEFORE_COMMIT, help=f"the 'before' commit (default {BEFORE_COMMIT})")
    sft = parser.add_mutually_exclusive_group()
    sft.add_argument("--sft-from", type=Path, help="a run directory holding a finished demo-vl SFT warm-up "
                                                   "(sft/warmup/done.json), e.g. an earlier run's WORKDIR/sft-run")
    sft.add_argument("--no-sft", action="store_true", help="GRPO from the random base model (sft.stages=[])")
    parser.add_argument("--cache", type=Path, help="LINGSHU_CACHE for every variant (default WORKDIR/cache)")
    parser.add_argument("--workdir", type=Path, help="where the trees, runs and logs go (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launcher run (default 1800)")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error(f"--steps {args.steps} leaves no measured step after --skip {args.skip}")

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="image_step-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache = (args.cache or workdir / "cache").resolve()
    cwd = workdir / "cwd"  # every launcher's working directory: not the repository (see the module docstring)
    cwd.mkdir(exist_ok=True)
    before_tree = workdir / "before-tree"
    if before_tree.exists():
        raise SystemExit(f"{before_tree} exists: use a new --workdir")
    extract(args.before, before_tree)
    before_label = git("rev-parse", "--short", args.before)
    variants = [("before", before_tree, before_label), ("after", REPO, after_label())]
    print(f"workdir {workdir}; LINGSHU_CACHE {cache}; {os.cpu_count()} cores; python {sys.executable}")
    for name, tree, label in variants:
        print(f"{name}: {label}: import lingshu_rl -> {check_import(tree, variant_env(tree, cache), cwd)}")

    after_env = variant_env(REPO, cache)
    start = time.perf_counter()
    prebuild(REPO, after_env, cwd)
    print(f"tiny model and images in {cache} ({time.perf_counter() - start:.0f} s)", flush=True)
    sft_from = None
    if args.sft_from:
        sft_output(args.sft_from.resolve())
        sft_from = args.sft_from.resolve()
    elif not args.no_sft:
        sft_from = run_sft(after_env, cwd, workdir / "sft-run", args.timeout)

    results = []
    for rnd in range(1, args.rounds + 1):
        for name, tree, label in variants:
            results.append(run_variant(name, tree, label, variant_env(tree, cache), cwd, workdir / f"{name}-{rnd}",
                                       args.steps, args.skip, sft_from, args.timeout))
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nGRPO of the multimodal demo (demo-vl, mcq_exact{', from its SFT warm-up' if sft_from else ', no SFT'}), "
          f"{args.steps} steps per variant and round, medians over the steps after the first {args.skip}; "
          f"{os.cpu_count()} cores; figures in {workdir / 'results.json'}")
    print_table(results, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
