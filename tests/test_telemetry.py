"""lingshu_rl.telemetry: files, wandb offline runs, Ray Prometheus gauges, console output, timing."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lingshu_rl.telemetry import (
    PhaseTimer,
    Progress,
    Telemetry,
    WandbConfig,
    format_step_line,
    metric_name,
    metrics_endpoint,
    prometheus_name,
    ray_init_options,
    redact,
)
from lingshu_rl.telemetry.jsonl import read_jsonl
from lingshu_rl.telemetry.redact import REDACTED, redact_argv

OFF = WandbConfig(mode="disabled")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _wandb_sandbox(tmp_path, monkeypatch):
    """Keep wandb's config/cache out of $HOME and make sure no real key is ever visible to a test."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- metrics.jsonl


def test_metrics_jsonl_rows_and_console_off(tmp_path, capsys):
    tel = Telemetry(tmp_path, {"lr": 1e-6}, OFF, ray_metrics=False, console=False)
    row = tel.log_step(1, {"reward/mean": 0.5, "actor/kl": 1, "bad": float("nan"), "skip": "text", "step": 99})
    tel.log_step(2, {"reward/mean": 0.75})
    # written and fsync'd before close
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tel.close()
    assert row == {"step": 1, "reward/mean": 0.5, "actor/kl": 1.0, "bad": None}
    assert rows == [row, {"step": 2, "reward/mean": 0.75}]
    assert isinstance(rows[0]["actor/kl"], float)
    assert capsys.readouterr().out == ""


def test_resume_truncates_rows_after_step_and_appends(tmp_path):
    tel = Telemetry(tmp_path, {}, OFF, ray_metrics=False, console=False)
    for step in range(1, 6):
        tel.log_step(step, {"reward/mean": step / 10})
        tel.log_samples(step, [{"prompt": "p", "response": f"r{step}", "reward": 1.0}])
    tel.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')  # a write torn by SIGKILL

    tel = Telemetry(tmp_path, {}, OFF, ray_metrics=False, console=False, resume_step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2, 3]
    tel.log_step(4, {"reward/mean": 0.9})
    tel.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in rows] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9)]


def test_fresh_open_appends_and_drops_only_a_torn_tail(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x"')
    tel = Telemetry(tmp_path, {}, OFF, ray_metrics=False, console=False)
    tel.log_step(2, {"x": 2.0})
    tel.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "x": 1.0}\n{"step": 2, "x": 2.0}\n'


def test_samples_jsonl(tmp_path):
    tel = Telemetry(tmp_path, {}, OFF, ray_metrics=False, console=False)
    tel.log_samples(7, [
        {"prompt": "Which drug? A) x B) y", "response": "B", "reward": 1.0, "answer": "B"},
        {"prompt": "肺炎?", "response": "A", "reward": float("nan"), "extra": Path("/a")},
    ])
    tel.close()
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert rows[0] == {"step": 7, "prompt": "Which drug? A) x B) y", "response": "B", "reward": 1.0, "answer": "B"}
    assert rows[1] == {"step": 7, "prompt": "肺炎?", "response": "A", "reward": None, "extra": "/a"}


# ---------------------------------------------------------------------------------------------------- plot


def test_reward_curve_png(tmp_path):
    tel = Telemetry(tmp_path, {}, OFF, ray_metrics=False, console=False)
    for step in range(1, 31):
        tel.log_step(step, {"reward/mean": step / 30, "reward/accuracy": step / 40})
    tel.close()
    tel.close()  # idempotent
    data = (tmp_path / "reward_curve.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "reward_curve.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_reward_curve_png_without_rewards(tmp_path):
    with Telemetry(tmp_path, {}, OFF, ray_metrics=False, console=False) as tel:
        tel.log_step(1, {"actor/kl": 0.1})
    assert (tmp_path / "reward_curve.png").read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------------------------------------------- wandb


def test_wandb_offline_run_directory_and_redaction(tmp_path, capsys, monkeypatch):
    argv = ["train.py", "--hf-token", "SECRET-ARGV-1", "--wandb_api_key=SECRET-ARGV-2", "--max-new-tokens", "64"]
    monkeypatch.setattr(sys, "argv", argv)
    config = {
        "model": "lingshu-7b",
        "max_new_tokens": 256,
        "visible_marker": "VISIBLE-CONFIG-VALUE",
        "hf_token": "hf_SECRET-TOKEN-VALUE",
        "nested": {"wandb_api_key": "SECRET-KEY-VALUE", "db": [{"password": "SECRET-PASSWORD-VALUE"}]},
    }
    cfg = WandbConfig(mode="offline", project="lingshu-test", run_name="offline-check", tags=["test"])
    tel = Telemetry(tmp_path, config, cfg, ray_metrics=False, console=False)
    assert tel.wandb.run is not None
    run_dir = tel.wandb.run_dir
    tel.log_step(1, {"reward/mean": 0.25})
    tel.log_step(2, {"reward/mean": 0.5})
    tel.close()
    assert tel.wandb.run is None

    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    run_files = list(run_dir.glob("run-*.wandb"))
    assert len(run_files) == 1 and run_files[0].stat().st_size > 0
    assert (run_dir / "logs").is_dir()
    data = run_files[0].read_bytes()
    assert b"VISIBLE-CONFIG-VALUE" in data and b"max_new_tokens" in data
    assert sys.argv is argv and argv[2] == "SECRET-ARGV-1"  # restored, untouched
    assert b"--max-new-tokens" in data  # the command line is recorded, minus its secrets
    for secret in (b"hf_SECRET-TOKEN-VALUE", b"SECRET-KEY-VALUE", b"SECRET-PASSWORD-VALUE", b"SECRET-ARGV"):
        assert secret not in data
    for path in tmp_path.rglob("*"):  # no secret anywhere under the output dir
        if path.is_file():
            assert b"SECRET-" not in path.read_bytes(), path
    # wandb neither captured nor printed to the console
    out = capsys.readouterr()
    assert "wandb" not in out.out.lower()


NO_NETWORK_SCRIPT = """
import os, socket, sys
real = socket.getaddrinfo
def spy(host, *args, **kwargs):
    if host not in ("localhost", "127.0.0.1", "::1"):
        os.write(2, f"LOOKUP {host}\\n".encode())
    return real(host, *args, **kwargs)
socket.getaddrinfo = spy
from lingshu_rl.telemetry import Telemetry, WandbConfig
tel = Telemetry(sys.argv[1], {"a": 1}, WandbConfig(), ray_metrics=False, console=False)
tel.log_step(1, {"reward/mean": 0.5})
tel.close()
print("DONE")
"""


def test_wandb_offline_never_touches_the_network(tmp_path, monkeypatch):
    """In a fresh interpreter (wandb 0.31's own usage telemetry fires from a thread at exit): no name lookups
    from the Python side, and nothing printed by wandb. wandb-core itself was checked with strace."""
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)
    done = subprocess.run([sys.executable, "-c", NO_NETWORK_SCRIPT, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "DONE\n"
    assert "LOOKUP" not in done.stderr, done.stderr
    assert "wandb:" not in done.stderr, done.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_online_without_key_falls_back_to_offline_and_resume_reuses_id(tmp_path):
    cfg = WandbConfig(mode="online", project="lingshu-test")
    tel = Telemetry(tmp_path, {}, cfg, ray_metrics=False, console=False)
    assert tel.wandb.mode == "offline"
    first_id = tel.wandb.run.id
    tel.log_step(1, {"reward/mean": 0.1})
    tel.close()
    tel = Telemetry(tmp_path, {}, WandbConfig(), ray_metrics=False, console=False, resume_step=1)
    assert tel.wandb.run.id == first_id
    tel.close()


def test_wandb_online_init_failure_falls_back_to_offline(tmp_path, monkeypatch):
    import wandb

    real_init = wandb.init

    def init(*args, **kwargs):
        if kwargs.get("mode") == "online":
            raise ConnectionError("no route to wandb")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    tel = Telemetry(tmp_path, {}, WandbConfig(mode="online"), ray_metrics=False, console=False)
    assert tel.wandb.mode == "offline" and tel.wandb.run is not None
    tel.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_disabled_writes_nothing(tmp_path):
    Telemetry(tmp_path, {}, OFF, ray_metrics=False, console=False).close()
    assert not (tmp_path / "wandb").exists()


def test_wandb_config_rejects_unknown_mode():
    with pytest.raises(ValueError):
        WandbConfig(mode="dryrun-ish")


def test_redact():
    config = {
        "hf_token": "a", "api_key": "b", "apiKey": "c", "WANDB_API_KEY": "d", "HFToken": "e",
        "aws_secret_access_key": "f", "db_password": "g", "secret": "h", "key": "i", "unset_token": None,
        "max_new_tokens": 256, "tokenizer": "tok", "tokenizer_path": "/t", "num_keys": 3, "model": "m",
        "nested": {"token": "x", "list": [{"password": "y", "lr": 1e-6}], "tuple": ({"secret": "z"},)},
    }
    out = redact(config)
    for key in ("hf_token", "api_key", "apiKey", "WANDB_API_KEY", "HFToken", "aws_secret_access_key",
                "db_password", "secret", "key"):
        assert out[key] == REDACTED, key
    assert out["unset_token"] is None
    for key in ("max_new_tokens", "tokenizer", "tokenizer_path", "num_keys", "model"):
        assert out[key] == config[key], key
    assert out["nested"] == {"token": REDACTED, "list": [{"password": REDACTED, "lr": 1e-6}],
                             "tuple": ({"secret": REDACTED},)}
    assert config["hf_token"] == "a" and config["nested"]["token"] == "x"  # input untouched


def test_redact_argv():
    argv = ["train.py", "--hf-token", "a", "--api_key=b", "trainer.secret=c", "--password", "--lr", "1e-6",
            "--max-new-tokens", "64", "--tokenizer=t", "model=m", "--key"]
    assert redact_argv(argv) == [
        "train.py", "--hf-token", REDACTED, f"--api_key={REDACTED}", f"trainer.secret={REDACTED}", "--password",
        "--lr", "1e-6", "--max-new-tokens", "64", "--tokenizer=t", "model=m", "--key",
    ]
    assert argv[2] == "a"


# ------------------------------------------------------------------------------------------ timing / console


def test_phase_timer():
    timer = PhaseTimer()
    with timer.phase("gen"):
        time.sleep(0.02)
    with timer.phase("upd"):
        pass
    with timer.phase("gen"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), timer.phase("sync"):
        raise RuntimeError
    m = timer.metrics()
    assert list(m) == ["timing/gen_s", "timing/upd_s", "timing/sync_s", "timing/step_s"]
    assert 0.03 <= m["timing/gen_s"] < 0.5
    assert m["timing/step_s"] >= m["timing/gen_s"] + m["timing/upd_s"] + m["timing/sync_s"]
    timer.reset()
    assert list(timer.metrics()) == ["timing/step_s"] and timer.metrics()["timing/step_s"] < 0.01
    with pytest.raises(ValueError):
        with timer.phase("step"):
            pass


def test_console_step_line_format():
    metrics = {
        "reward/mean": 0.41234, "reward/accuracy": 0.38, "actor/kl": 0.0021, "response/length_mean": 9.8,
        "timing/gen_s": 1.2, "timing/score_s": 0.3, "timing/ref_s": 0.2, "timing/upd_s": 1.1,
        "timing/sync_s": 0.1, "timing/step_s": 3.1, "other/x": 5.0,
    }
    assert format_step_line(12, metrics, 50) == (
        "step 12/50 | reward 0.412 acc 0.38 | kl 0.0021 | len 9.8 | 3.1s (gen 1.2 score 0.3 ref 0.2 upd 1.1 sync 0.1)"
    )
    assert format_step_line(3, {}) == "step 3"
    assert format_step_line(3, {"reward/accuracy": 1.0, "response/length_mean": 1234.4}) == (
        "step 3 | acc 1 | len 1234"
    )
    assert format_step_line(3, {"actor/kl": None, "timing/step_s": 12.34}, 9) == "step 3/9 | kl - | 12.3s"


def test_telemetry_prints_one_line_per_step(tmp_path):
    out = io.StringIO()
    tel = Telemetry(tmp_path, {}, OFF, ray_metrics=False, total_steps=2, stream=out)
    tel.log_step(1, {"reward/mean": 0.25, "timing/step_s": 1.0})
    tel.log_step(2, {"reward/mean": 0.5})
    tel.close()
    assert out.getvalue() == "step 1/2 | reward 0.25 | 1s\nstep 2/2 | reward 0.5\n"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_when_not_a_tty():
    out = io.StringIO()
    with Progress(total=4, desc="grpo", file=out, min_interval_s=3600) as bar:
        for i in range(4):
            bar.update(1, postfix=f"reward 0.{i}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then throttled until the last
    assert lines[0].startswith("grpo 1/4 (25%) [0:00<0:00]") and lines[0].endswith("reward 0.0")
    assert lines[1].startswith("grpo 4/4 (100%)") and lines[1].endswith("reward 0.3")
    assert "\r" not in out.getvalue()

    out = io.StringIO()
    with Progress(total=None, desc="eval", file=out, min_interval_s=3600) as bar:
        bar.update(2)
        bar.update(3)
    assert out.getvalue().splitlines() == ["eval 2 [0:00]", "eval 5 [0:00]"]  # close flushes the throttled one


def test_progress_bar_on_tty_and_console_lines_above_it(tmp_path):
    out = FakeTTY()
    with Progress(total=2, desc="grpo", file=out, width=10) as bar:
        bar.update(1, postfix="reward 0.31")
        tel = Telemetry(tmp_path, {}, OFF, ray_metrics=False, stream=out)
        tel.log_step(1, {"reward/mean": 0.31})
        tel.close()
        bar.update(1)
    text = out.getvalue()
    assert "\r\x1b[Kgrpo  50%|#####.....| 1/2 [0:00<0:00] reward 0.31" in text
    assert "\r\x1b[Kstep 1 | reward 0.31\n" in text  # the bar line is cleared before the step line
    assert text.endswith("grpo 100%|##########| 2/2 [0:00<0:00] reward 0.31\n")


# --------------------------------------------------------------------------------------------------- Ray


def test_metric_names_and_init_options():
    assert metric_name("reward/mean") == "lingshu_reward_mean"
    assert metric_name("timing/gen_s") == "lingshu_timing_gen_s"
    assert metric_name("a//b-c.d") == "lingshu_a_b_c_d"
    assert prometheus_name("reward/accuracy") == "ray_lingshu_reward_accuracy"
    opts = ray_init_options(metrics_export_port=1234)
    assert opts == {
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 8265,
        "_metrics_export_port": 1234, "_system_config": {"metrics_report_interval_ms": 1000},
    }
    assert "_metrics_export_port" not in ray_init_options()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read().decode()


def _sample(text: str, name: str, run: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'run="{run}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.slow
def test_ray_gauges_reach_prometheus_endpoint(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to Ray's servers from a test
    if ray.is_initialized():
        pytest.skip("another test left a Ray cluster running in this process")
    metrics_port, dashboard_port = free_port(), free_port()
    from lingshu_rl.launch.ray_cluster import init_local_ray

    context = init_local_ray(
        **ray_init_options(dashboard_port=dashboard_port, metrics_export_port=metrics_port),
        num_cpus=2, log_to_driver=False,
    )
    try:
        assert context.dashboard_url == f"127.0.0.1:{dashboard_port}"
        psutil = pytest.importorskip("psutil")
        listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == dashboard_port}
        assert listening == {"127.0.0.1"}  # the dashboard is not reachable from other hosts
        assert context.address_info["metrics_export_port"] == metrics_port
        url = metrics_endpoint()
        assert url == f"http://127.0.0.1:{metrics_port}/metrics"

        tel = Telemetry(tmp_path, {}, OFF, ray_metrics=True, console=False, run_name="ray-check")
        tel.log_step(3, {"reward/mean": 0.412, "timing/gen_s": 1.5})
        text, deadline = "", time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                text = _scrape(url)
            except OSError:
                text = ""
            if _sample(text, "ray_lingshu_reward_mean", "ray-check") is not None:
                break
            time.sleep(0.25)
        assert _sample(text, "ray_lingshu_reward_mean", "ray-check") == pytest.approx(0.412), text[-2000:]
        assert re.search(r"^# TYPE ray_lingshu_reward_mean gauge$", text, re.M)
        assert _sample(text, "ray_lingshu_timing_gen_s", "ray-check") == pytest.approx(1.5)
        assert _sample(text, "ray_lingshu_step", "ray-check") == 3.0
        tel.close()
    finally:
        ray.shutdown()


def test_redact_text_keeps_prompts_and_responses_out_of_samples(tmp_path: Path) -> None:
    from lingshu_rl.telemetry import Telemetry

    row = {"id": "s1", "prompt": "Patient, 54, with chest pain", "response": "aspirin", "answer": "A", "reward": 1.0}
    with Telemetry(tmp_path / "private", wandb=WandbConfig(mode="disabled"), ray_metrics=False, console=False,
                   redact_text=True) as private:
        private.log_samples(1, [row])
    with Telemetry(tmp_path / "plain", wandb=WandbConfig(mode="disabled"), ray_metrics=False, console=False) as plain:
        plain.log_samples(1, [row])
    assert json.loads((tmp_path / "private" / "samples.jsonl").read_text()) == {"step": 1, "id": "s1", "reward": 1.0}
    assert "chest pain" in (tmp_path / "plain" / "samples.jsonl").read_text()
