"""Launchers: shell syntax, the commands each dry run prints, and the sweep runner."""

import importlib.util
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("common.sh", "local.sh", "tpu_pod.sh", "slurm_gpu.sbatch", "serve_worker.sh")


def _load_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"launch_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_file(ROOT / "launch" / "sweep.py")


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ.update(DRY_RUN="1", **env)
    result = subprocess.run(
        ["bash", f"launch/{script}", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _remote(line: str) -> str:
    """The ``--command`` an ssh line of tpu_pod.sh runs on the remote host."""
    (command,) = [w for w in shlex.split(line) if w.startswith("--command=")]
    return command.removeprefix("--command=")


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script):
    result = subprocess.run(["bash", "-n", f"launch/{script}"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_local_dry_run_starts_workers_then_the_learner():
    lines = _dry_run(
        "local.sh",
        "--config.seed=3",
        WORKDIR="/tmp/w",
        NUM_WORKERS="2",
        WORKER_FLAGS="--max_trajectories=8",
        CONFIG="configs/ggpo.py:tiny,gspo",
    )
    worker = (
        "python -m vimrag_jax.rollout.worker --config=configs/ggpo.py:tiny,gspo --workdir=/tmp/w "
        "--worker_id=local{0} --max_trajectories=8 --config.seed=3 "
        "> /tmp/w/logs/worker_{0}.log 2>&1 &"
    )
    assert lines == [
        worker.format(0),
        worker.format(1),
        "python -m vimrag_jax.train --config=configs/ggpo.py:tiny,gspo --workdir=/tmp/w "
        "--config.rollout.embedded_workers=0 --config.seed=3",
    ]


def test_local_rejects_a_bad_worker_count():
    result = subprocess.run(
        ["bash", "launch/local.sh"],
        cwd=ROOT,
        env=dict(os.environ, DRY_RUN="1", NUM_WORKERS="two"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "NUM_WORKERS must be a number" in result.stderr


def test_tpu_pod_dry_run():
    lines = _dry_run(
        "tpu_pod.sh",
        "--config.model.path=/mnt/m",
        TPU_NAME="pod",
        ZONE="us-east5-a",
        WORKDIR="/mnt/run",
        ROLLOUT_VMS="g1 g2",
        WORKERS_PER_VM="2",
    )
    text = "\n".join(lines)
    assert lines[0].startswith("tar czf /tmp/vimrag_jax_src.tgz --exclude=.venv")
    assert "gcloud compute tpus tpu-vm scp /tmp/vimrag_jax_src.tgz pod:/tmp/" in text
    assert sum("rollout.worker" in line for line in lines) == 4  # 2 VMs x 2 workers
    ids = [re.search(r"--worker_id=(\S+)", line).group(1) for line in lines if "worker_id" in line]
    assert ids == ["g1-w0", "g1-w1", "g2-w0", "g2-w1"]  # distinct: no shard name collides
    installs = [line for line in lines if "pip install" in line]
    assert len(installs) == 3  # the pod, then each rollout VM
    # The tpu / cuda12 extras with setup.py's ranges: constraints.txt pins the CPU set.
    assert installs[0].startswith(
        "gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all"
    )
    assert _remote(installs[0]).endswith(
        "source scripts/venv.sh && pip install --quiet -e '.[tpu]'"
    )
    for vm, line in zip(("g1", "g2"), installs[1:], strict=True):
        assert line.startswith(f"gcloud compute ssh {vm} ")
        assert _remote(line).endswith("pip install --quiet -e '.[cuda12]'")  # JAX sampler
    assert not any("constraints.txt" in line for line in installs)
    learner = lines[-1]
    assert learner.startswith("gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all")
    for part in (
        "python -m vimrag_jax.train --config=configs/ggpo.py:qwen3vl_8b --workdir=/mnt/run",
        "--config.distributed.enabled=True",
        "--config.rollout.embedded_workers=0 --config.model.path=/mnt/m",
    ):
        assert part in learner
    only_train = _dry_run("tpu_pod.sh", TPU_NAME="p", ZONE="z", WORKDIR="/w", STAGES="train")
    assert len(only_train) == 1 and "vimrag_jax.train" in only_train[0]


def test_tpu_pod_needs_its_variables():
    result = subprocess.run(
        ["bash", "launch/tpu_pod.sh"],
        cwd=ROOT,
        env=dict(os.environ, DRY_RUN="1"),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "set TPU_NAME" in result.stderr


def test_slurm_dry_run_splits_nodes_between_learner_and_workers():
    lines = _dry_run(
        "slurm_gpu.sbatch",
        "--config.seed=1",
        SLURM_JOB_NUM_NODES="3",
        SLURM_JOB_ID="42",
        LEARNER_NODES="2",
        WORKERS_PER_NODE="4",
        WORKDIR="/shared/r",
        PYTHON="python",
    )
    assert lines == [
        "srun --nodes=1 --relative=2 --ntasks=4 --ntasks-per-node=4 --gpus-per-task=1 "
        "--kill-on-bad-exit=0 python -m vimrag_jax.rollout.worker "
        "--config=configs/ggpo.py:qwen3vl_8b --workdir=/shared/r --worker_id=slurm "
        "--worker_id_env=SLURM_PROCID --config.seed=1 "
        "> /shared/r/logs/workers_42.log 2>&1 &",
        "srun --nodes=2 --relative=0 --ntasks=2 --ntasks-per-node=1 --gpus-per-node=8 "
        "--kill-on-bad-exit=1 python -m vimrag_jax.train --config=configs/ggpo.py:qwen3vl_8b "
        "--workdir=/shared/r --config.distributed.enabled=True "
        "--config.rollout.embedded_workers=0 --config.seed=1",
    ]
    learner_only = _dry_run("slurm_gpu.sbatch", SLURM_JOB_NUM_NODES="2", LEARNER_NODES="2")
    assert len(learner_only) == 1 and "vimrag_jax.train" in learner_only[0]


def test_sweep_expands_algorithm_by_seed():
    runs = sweep.load_sweep("configs/sweeps/ggpo_vs_gspo.py:qwen3vl_2b,seeds=2")
    lines = sweep.commands(runs, "/runs", ["--config.optim.total_steps=5"], python="python")
    assert [" ".join(line) for line in lines] == [
        f"python -m vimrag_jax.train --config=configs/ggpo.py:qwen3vl_2b,{algo} "
        f"--workdir=/runs/{algo}_seed{seed} --config.seed={seed} --config.optim.total_steps=5"
        for algo in ("ggpo", "gspo")
        for seed in (0, 1)
    ]
    assert len(sweep.load_sweep("configs/sweeps/ggpo_vs_gspo.py")) == 6  # tiny, 3 seeds
    with pytest.raises(ValueError, match="unknown preset"):
        sweep.load_sweep("configs/sweeps/ggpo_vs_gspo.py:huge")
    with pytest.raises(FileNotFoundError):
        sweep.load_sweep("configs/sweeps/nope.py")


def test_sweep_dry_run_prints_and_real_run_goes_in_order(monkeypatch, capsys):
    spec = "configs/sweeps/ggpo_vs_gspo.py:tiny,seeds=1"
    assert sweep.main([f"--sweep={spec}", "--workdir=/r", "--dry_run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[1].endswith("--workdir=/r/gspo_seed0 --config.seed=0")

    calls = []

    def fake_run(command, cwd, check):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1 if "ggpo_seed" in command[4] else 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    assert sweep.main([f"--sweep={spec}", "--workdir=/r"]) == 1  # stops at the failure
    assert len(calls) == 1
    assert sweep.main([f"--sweep={spec}", "--workdir=/r", "--keep_going"]) == 1
    assert len(calls) == 3 and "gspo_seed" in calls[-1][4]


def test_every_sweep_run_names_an_existing_config_file():
    for run in sweep.load_sweep("configs/sweeps/ggpo_vs_gspo.py"):
        path, _, arg = run["config"].partition(":")
        assert (ROOT / path).is_file(), path
        config = _load_file(ROOT / path).get_config(arg)
        assert run["name"] == f"{config.algorithm}_seed{run['overrides']['seed']}"


def test_one_launcher_line_starts_workers_with_distinct_ids():
    from absl import app

    from vimrag_jax.rollout.worker import worker_id

    ids = {worker_id("slurm", "SLURM_PROCID", {"SLURM_PROCID": str(i)}) for i in range(4)}
    assert ids == {"slurm0", "slurm1", "slurm2", "slurm3"}
    assert worker_id("w0", "", {}) == "w0"
    with pytest.raises(app.UsageError, match="SLURM_PROCID is not set"):
        worker_id("slurm", "SLURM_PROCID", {})


# --- SERVER=sglang|vllm: a server beside every rollout worker (launch/serve_worker.sh) ---------

SGLANG_FLAGS = ("SGLANG_RETURN_ORIGINAL_LOGPROB=1", "-m sglang.launch_server", "--weight-version 0")
VLLM_FLAGS = (
    "VLLM_SERVER_DEV_MODE=1",
    "--served-model-name policy",
    "--logprobs-mode raw_logprobs",
    "--chat-template-content-format openai",
    "--trust-request-chat-template",
)


def _expand(line: str, **env: str) -> list[str]:
    """Runs, in dry-run mode, the serve_worker.sh invocation a launcher printed (``line``:
    ``env VAR=... bash .../serve_worker.sh ARGS`` with an optional ``> LOG 2>&1 &``), and returns
    the commands that wrapper would run."""
    words = shlex.split(line)
    if ">" in words:
        words = words[: words.index(">")]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SERVER"))}
    environ.update(DRY_RUN="1", **env)
    result = subprocess.run(
        words, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _served(lines: list[str]) -> tuple[str, str, str]:
    """The server line, the readiness-wait line and the worker line of a wrapper's dry run."""
    (server,) = [line for line in lines if line.endswith(" 2>&1 &")]
    (wait,) = [line for line in lines if line.startswith("# wait")]
    (worker,) = [line for line in lines if "vimrag_jax.rollout.worker" in line]
    assert lines.index(server) < lines.index(wait) < lines.index(worker)
    return server, wait, worker


def _flag(line: str, name: str) -> str:
    return re.search(rf"{re.escape(name)}[= ](\S+)", line).group(1)


def test_local_with_sglang_starts_a_server_per_worker_on_its_own_port():
    lines = _dry_run(
        "local.sh",
        "--config.model.path=/m/qwen",
        SERVER="sglang",
        NUM_WORKERS="3",
        WORKDIR="/tmp/w",
        SERVER_GPUS="4 5 6,7",
    )
    assert len(lines) == 4 and "serve_worker.sh" not in lines[3]
    learner = lines[3]
    assert learner.startswith("python -m vimrag_jax.train ")
    assert "--config.publish.hf_layout=on" in learner and "rollout.backend" not in learner
    ports, ids = [], []
    for i, line in enumerate(lines[:3]):
        assert line.endswith(f"> /tmp/w/logs/worker_{i}.log 2>&1 &")
        server, wait, worker = _served(_expand(line))
        port = _flag(server, "--port")
        ports.append(port)
        ids.append(_flag(worker, "--worker_id"))
        assert server.startswith(f"env CUDA_VISIBLE_DEVICES={['4', '5', '6,7'][i]} ")
        for part in SGLANG_FLAGS:
            assert part in server
        assert "--model-path /m/qwen --host 127.0.0.1 " in server  # loopback only
        assert ("--tp-size 2" in server) == (i == 2)
        assert server.endswith(f"> /tmp/w/logs/server_local{i}.log 2>&1 &")
        assert f"http://127.0.0.1:{port}/health" in wait and f"server_local{i}.log" in wait
        assert worker.endswith(
            f"--config.rollout.backend=sglang --config.rollout.server_url=http://127.0.0.1:{port}"
        )
        assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in worker
    assert ports == ["30000", "30001", "30002"]
    assert ids == ["local0", "local1", "local2"]


def test_local_rejects_a_bad_server_and_gpu_lists():
    for env, message in (
        ({"SERVER": "tgi"}, "SERVER must be none, sglang or vllm"),
        ({"SERVER": "vllm", "NUM_WORKERS": "2", "SERVER_GPUS": "0"}, "one device list per worker"),
    ):
        result = subprocess.run(
            ["bash", "launch/local.sh"],
            cwd=ROOT,
            env=dict(os.environ, DRY_RUN="1", **env),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr


def test_slurm_with_vllm_gives_every_task_its_server_port_and_link():
    lines = _dry_run(
        "slurm_gpu.sbatch",
        "--config.model.path=/shared/qwen",
        SLURM_JOB_NUM_NODES="3",
        SLURM_JOB_ID="7",
        WORKERS_PER_NODE="4",
        WORKDIR="/shared/r",
        PYTHON="python",
        SERVER="vllm",
    )
    workers, learner = lines
    assert workers.startswith(
        "srun --nodes=2 --relative=1 --ntasks=8 --ntasks-per-node=4 --gpus-per-task=1 "
        "--kill-on-bad-exit=0 env SERVER=vllm "
    )
    assert "WORKER_ID=slurm WORKER_ID_ENV=SLURM_PROCID LOCAL_INDEX_ENV=SLURM_LOCALID" in workers
    assert "--config.publish.hf_layout=on" in learner
    task = workers[workers.index(" env ") + 1 :]
    seen, ids = {}, []
    for rank in range(8):  # two nodes of four tasks: what srun gives each task
        local = rank % 4
        lines = _expand(task, SLURM_PROCID=str(rank), SLURM_LOCALID=str(local))
        server, wait, worker = _served(lines)
        link = f"/shared/r/serving/slurm{rank}"
        assert lines[:2] == ["mkdir -p /shared/r/serving", f"ln -sfn /shared/qwen {link}"]
        assert server.startswith(f"env VLLM_SERVER_DEV_MODE=1 vllm serve {link} ")
        for part in VLLM_FLAGS:
            assert part in server
        assert "--host 127.0.0.1 " in server and "--tensor-parallel-size" not in server
        port = _flag(server, "--port")
        assert f"http://127.0.0.1:{port}/health" in wait
        for part in (
            f"--worker_id=slurm{rank} ",
            "--config.rollout.backend=vllm",
            f"--config.rollout.server_url=http://127.0.0.1:{port}",
            "--config.rollout.server_model=policy",
            f"--config.rollout.serving_path={link}",
        ):
            assert part in worker
        seen[rank] = (rank // 4, port)
        ids.append(_flag(worker, "--worker_id"))
    assert ids == [f"slurm{rank}" for rank in range(8)]  # distinct: the global rank
    assert len(set(seen.values())) == 8  # no two tasks of one node share a port
    assert {port for _, port in seen.values()} == {"8000", "8001", "8002", "8003"}


def test_tpu_pod_with_sglang_installs_the_server_and_starts_one_per_worker():
    lines = _dry_run(
        "tpu_pod.sh",
        "--config.model.path=/mnt/m",
        TPU_NAME="pod",
        ZONE="us-east5-a",
        WORKDIR="/mnt/run",
        ROLLOUT_VMS="g1 g2",
        WORKERS_PER_VM="2",
        SERVER="sglang",
        SERVER_GPUS="0,1 2,3",
        SERVER_TIMEOUT="600",
    )
    installs = [_remote(line) for line in lines if "pip install" in line]
    assert installs[0].endswith("pip install --quiet -e '.[tpu]'")
    for command in installs[1:]:  # the worker builds no model: the CPU set, and the server
        assert ".[cuda12]" not in command
        assert command.endswith(".venv-server/bin/pip install --quiet sglang")
    assert len(installs) == 3
    started = [line for line in lines if "serve_worker.sh" in line]
    assert [line.split()[3] for line in started] == ["g1", "g1", "g2", "g2"]
    ports = {}
    for line in started:
        command = _remote(line)
        assert "mkdir -p /mnt/run/logs && nohup env SERVER=sglang " in command
        server, wait, worker = _served(_expand(command[command.index("nohup ") + 6 :]))
        worker_id = _flag(worker, "--worker_id")
        assert command.endswith(f"> /mnt/run/logs/worker_{worker_id}.log 2>&1 < /dev/null &")
        assert server.startswith(
            f"env CUDA_VISIBLE_DEVICES={'0,1' if worker_id.endswith('0') else '2,3'} "
            "SGLANG_RETURN_ORIGINAL_LOGPROB=1 .venv-server/bin/python -m sglang.launch_server "
            "--model-path /mnt/m --host 127.0.0.1 "
        )
        assert "--weight-version 0 --tp-size 2 " in server and "up to 600s" in wait
        port = _flag(server, "--port")
        assert f"--config.rollout.server_url=http://127.0.0.1:{port}" in worker
        ports[worker_id] = port
    assert ports == {"g1-w0": "30000", "g1-w1": "30001", "g2-w0": "30000", "g2-w1": "30001"}
    assert "--config.publish.hf_layout=on --config.model.path=/mnt/m" in lines[-1]


def test_serve_worker_needs_server_model_and_id():
    base = dict(SERVER="sglang", WORKDIR="/w", WORKER_ID="a")
    for env, message in (
        ({**base, "SERVER": "none"}, "SERVER must be sglang or vllm"),
        ({**base, "WORKER_ID": ""}, "set WORKER_ID"),
        (base, "set MODEL"),
        ({**base, "MODEL": "/m", "WORKER_ID_ENV": "SLURM_PROCID"}, "SLURM_PROCID is not set"),
        ({**base, "MODEL": "/m", "LOCAL_INDEX": "x"}, "must be a number"),
        ({**base, "MODEL": "/m", "SERVER_PORT": "65535", "LOCAL_INDEX": "1"}, "out of range"),
    ):
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SERVER"))}
        result = subprocess.run(
            ["bash", "launch/serve_worker.sh"],
            cwd=ROOT,
            env=dict(environ, DRY_RUN="1", **env),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr, (env, result.stderr)


# A stand-in for `python -m sglang.launch_server` / `vllm serve`: records how it was started and
# answers GET /health on its --host/--port (FAKE_MODE=exit: dies at once; silent: never listens).
# It ends itself after 2 minutes, so a launcher that failed to stop it leaves nothing behind.
FAKE_SERVER = """
import http.server, json, os, sys, threading, time
timer = threading.Timer(120, os._exit, (9,))
timer.daemon = True
timer.start()
args = sys.argv[1:]
with open(os.environ["FAKE_DIR"] + "/server.json", "w") as f:
    json.dump({"argv": args, "pid": os.getpid(), "env": dict(os.environ)}, f)
mode = os.environ.get("FAKE_MODE", "")
if mode == "exit":
    print("CUDA out of memory (fake)", flush=True)
    sys.exit(3)
if mode == "silent":
    time.sleep(600)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
http.server.HTTPServer((host, port), Health).serve_forever()
"""

# A stand-in for `$PYTHON -m vimrag_jax.rollout.worker ...`: asks the server URL it was given
# for /health, records that, then exits 7 (FAKE_WORKER=wait: waits for TERM, then exits 0).
FAKE_WORKER = """
import json, os, signal, sys, time, urllib.request
args = sys.argv[1:]
url = [a for a in args if a.startswith("--config.rollout.server_url=")][0].split("=", 1)[1]
status = urllib.request.urlopen(url + "/health", timeout=5).status
record = {"argv": args, "health": status, "env": dict(os.environ)}
def save(**more):
    with open(os.environ["FAKE_DIR"] + "/worker.json", "w") as f:
        json.dump({**record, **more}, f)
if os.environ.get("FAKE_WORKER") == "wait":
    signal.signal(signal.SIGTERM, lambda *_: (save(stopped=True), sys.exit(0)))
    save(stopped=False)
    time.sleep(120)  # TERM ends it sooner
    sys.exit(9)
save()
sys.exit(7)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gone(pid: int, within_s: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _fakes(tmp_path: Path, server: str, **extra: str) -> dict[str, str]:
    """The environment that runs serve_worker.sh for real against the fake server and worker."""
    import sys

    (tmp_path / "server.py").write_text(FAKE_SERVER)
    python = tmp_path / "python"
    python.write_text(f"#!{sys.executable}\n{FAKE_WORKER}")
    python.chmod(0o755)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SERVER"))}
    environ.update(
        SERVER=server,
        MODEL=str(model),
        WORKDIR=str(tmp_path / "run"),
        WORKER_ID="t",
        LOCAL_INDEX="1",
        PYTHON=str(python),
        SERVER_CMD=f"{sys.executable} {tmp_path / 'server.py'}",
        SERVER_PORT=str(_free_port() - 1),
        SERVER_POLL="0.1",
        SERVER_TIMEOUT="20",
        FAKE_DIR=str(tmp_path),
    )
    environ.update(extra)
    environ.pop("DRY_RUN", None)
    return environ


def _serve(environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "launch/serve_worker.sh", "--config.seed=5"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("server", ["sglang", "vllm"])
def test_serve_worker_runs_the_worker_against_a_ready_server_then_stops_it(tmp_path, server):
    import json

    environ = _fakes(tmp_path, server)
    result = _serve(environ)
    assert result.returncode == 7, result.stderr  # the worker's status
    started = json.loads((tmp_path / "server.json").read_text())
    worker = json.loads((tmp_path / "worker.json").read_text())
    port = int(environ["SERVER_PORT"]) + 1
    args = " ".join(started["argv"])
    assert f"--host 127.0.0.1 --port {port}" in args
    assert worker["health"] == 200  # the server answered before the worker started
    assert f"--config.rollout.server_url=http://127.0.0.1:{port}" in worker["argv"]
    assert worker["argv"][:4] == [
        "-m",
        "vimrag_jax.rollout.worker",
        "--config=configs/ggpo.py",
        f"--workdir={tmp_path / 'run'}",
    ]
    assert "--worker_id=t" in worker["argv"] and "--config.seed=5" in worker["argv"]
    assert worker["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    if server == "sglang":
        assert started["env"]["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"
        assert f"--model-path {tmp_path / 'model'}" in args and "--weight-version 0" in args
    else:
        link = tmp_path / "run" / "serving" / "t"
        assert os.readlink(link) == str(tmp_path / "model")
        assert started["argv"][0] == str(link)
        assert started["env"]["VLLM_SERVER_DEV_MODE"] == "1"
        for flag in VLLM_FLAGS[1:]:
            assert flag in args
        assert f"--config.rollout.serving_path={link}" in worker["argv"]
    assert _gone(started["pid"])  # stopped when the worker exited
    assert (tmp_path / "run" / "logs" / "server_t.log").is_file()


def test_serve_worker_fails_naming_the_log_when_the_server_dies(tmp_path):
    result = _serve(_fakes(tmp_path, "sglang", FAKE_MODE="exit"))
    log = tmp_path / "run" / "logs" / "server_t.log"
    assert result.returncode == 1
    assert "exited before" in result.stderr and str(log) in result.stderr
    assert "CUDA out of memory (fake)" in result.stderr  # the log's tail
    assert not (tmp_path / "worker.json").exists()


def test_serve_worker_times_out_naming_the_log_and_stops_the_server(tmp_path):
    import json

    result = _serve(_fakes(tmp_path, "vllm", FAKE_MODE="silent", SERVER_TIMEOUT="1"))
    assert result.returncode == 1
    assert "did not answer within 1s" in result.stderr
    assert str(tmp_path / "run" / "logs" / "server_t.log") in result.stderr
    assert not (tmp_path / "worker.json").exists()
    assert _gone(json.loads((tmp_path / "server.json").read_text())["pid"])


def test_serve_worker_refuses_a_port_another_server_answers(tmp_path):
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    environ = _fakes(tmp_path, "sglang")
    port = int(environ["SERVER_PORT"]) + 1
    other = http.server.HTTPServer(("127.0.0.1", port), Healthy)  # left from an earlier run
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        result = _serve(environ)
    finally:
        other.shutdown()
        other.server_close()
    assert result.returncode == 1 and "something already answers" in result.stderr
    assert not (tmp_path / "server.json").exists()


def test_serve_worker_passes_term_to_the_worker_then_stops_the_server(tmp_path):
    import json
    import signal
    import time

    environ = _fakes(tmp_path, "sglang", FAKE_WORKER="wait")
    process = subprocess.Popen(
        ["bash", "launch/serve_worker.sh"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    record = tmp_path / "worker.json"
    deadline = time.monotonic() + 30
    while not record.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert record.exists(), process.communicate(timeout=30)
    time.sleep(0.2)  # the wrapper is in its wait for the worker
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr  # the worker finished and exited 0
    assert json.loads(record.read_text())["stopped"] is True
    assert _gone(json.loads((tmp_path / "server.json").read_text())["pid"])
