"""The worker processes `lmbatch worker` / `lmbatch up` would start: argv and environment, nothing started."""

from __future__ import annotations

import subprocess
import sys

import pytest

from db.names import MULTI_GPU_QUEUE
from db.settings import Settings
from tests.stack import REPO
from workers.plan import WorkerPlan, WorkerPlanError, plan_workers


def settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)


def no_discovery() -> list[int]:
    raise AssertionError("GPU discovery must not run when --gpus names the GPUs")


def flag(plan: WorkerPlan, name: str) -> str:
    return plan.argv[plan.argv.index(name) + 1]


def test_explicit_gpus_give_one_prefork_worker_per_gpu_pinned_by_cuda_visible_devices() -> None:
    # Given --gpus 0,2
    # When the workers are planned
    plans = plan_workers(settings(), gpus="0,2", base_env={"PATH": "/bin"}, discover=no_discovery)
    # Expect one worker per GPU, each seeing only its own GPU, named after it, one pool process, task events on
    assert [p.node for p in plans] == ["gpu0@%h", "gpu2@%h"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "2"]
    for plan in plans:
        assert plan.argv[:6] == [sys.executable, "-m", "celery", "-A", "workers.app", "worker"]
        assert (flag(plan, "-P"), flag(plan, "-c"), flag(plan, "-n")) == ("prefork", "1", plan.node)
        assert "-E" in plan.argv
        # and SIGTERM remapped to a soft shutdown, the caller's environment kept
        assert plan.env["REMAP_SIGTERM"] == "SIGQUIT"
        assert plan.env["PATH"] == "/bin"
        assert MULTI_GPU_QUEUE not in plan.queues


def test_two_gpus_per_worker_pairs_gpus_and_consumes_the_multi_gpu_queue() -> None:
    # Given a host with four GPUs and --gpus-per-worker 2
    plans = plan_workers(settings(), gpus="all", gpus_per_worker=2, discover=lambda: [0, 1, 2, 3])
    # Expect two workers owning two GPUs each, both consuming finetune.multi
    assert [(p.node, p.env["CUDA_VISIBLE_DEVICES"]) for p in plans] == [("gpu0-1@%h", "0,1"), ("gpu2-3@%h", "2,3")]
    assert all(MULTI_GPU_QUEUE in flag(p, "-Q").split(",") for p in plans)


def test_a_remainder_gpu_gets_its_own_single_gpu_worker() -> None:
    # Given three GPUs and --gpus-per-worker 2
    plans = plan_workers(settings(), gpus="all", gpus_per_worker=2, discover=lambda: [0, 1, 2])
    # Expect no idle GPU: the third one has a worker of its own, without the multi-GPU queue
    assert [p.gpus for p in plans] == [(0, 1), (2,)]
    assert MULTI_GPU_QUEUE in plans[0].queues and MULTI_GPU_QUEUE not in plans[1].queues


def test_gpus_none_gives_one_cpu_worker_that_sees_no_gpu() -> None:
    # Given --gpus none on a host that has GPUs
    plans = plan_workers(settings(), gpus="none", discover=no_discovery)
    # Expect one CPU worker, with the GPUs hidden from it
    assert [(p.node, p.env["CUDA_VISIBLE_DEVICES"], p.gpus) for p in plans] == [("cpu@%h", "", ())]


def test_no_gpu_found_falls_back_to_cpu_workers() -> None:
    # Given --gpus all on a host without GPUs
    # Expect the requested number of CPU workers, with distinct node names when there are several
    assert [p.node for p in plan_workers(settings(), discover=list)] == ["cpu@%h"]
    assert [p.node for p in plan_workers(settings(), cpu_workers=2, discover=list)] == ["cpu0@%h", "cpu1@%h"]
    assert plan_workers(settings(), cpu_workers=0, discover=list) == []


def test_default_queues_are_the_configured_kinds_plus_maintenance() -> None:
    # Given all kinds, then a host configured for generation only
    everything = plan_workers(settings(), gpus="none")[0]
    generation = plan_workers(settings(worker_kinds=["generate"]), gpus="none")[0]
    # Expect each kind's queue and maintenance, in a stable order
    assert flag(everything, "-Q") == "generate,classify,embed,finetune,quantize,maintenance"
    assert generation.queues == ("generate", "maintenance")


def test_explicit_queues_are_used_as_given_and_unknown_ones_refused() -> None:
    # Given --queues embed,maintenance
    plan = plan_workers(settings(), gpus="0", queues="embed, maintenance", discover=no_discovery)[0]
    # Expect exactly those
    assert plan.queues == ("embed", "maintenance")
    # And a misspelt queue is an error naming it, not a worker that silently waits on nothing
    with pytest.raises(WorkerPlanError, match="embd"):
        plan_workers(settings(), gpus="none", queues="embd")


@pytest.mark.parametrize("spec", ["0,x", "-1", "1,1"])
def test_malformed_gpu_lists_are_refused(spec: str) -> None:
    with pytest.raises(WorkerPlanError):
        plan_workers(settings(), gpus=spec, discover=no_discovery)


def test_gpu_discovery_and_the_cli_do_not_import_torch() -> None:
    # Given a fresh interpreter
    # When the CLI is imported and the GPUs are discovered (this machine: nvidia-smi or nothing)
    code = (
        "import sys, api.cli.main, api.cli.stack.launcher; from workers.plan import discover_gpus; "
        "gpus = discover_gpus(); assert 'torch' not in sys.modules, 'torch imported'; print(gpus)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    # Expect a list of indices, and torch (hence CUDA) never loaded into the parent that forks the workers
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("[")


def test_the_webhook_worker_is_a_thread_pool_that_sees_no_gpu() -> None:
    # Given --queues webhooks (what the deploy files' webhook service runs), on a host with GPUs
    plans = plan_workers(settings(), queues="webhooks", base_env={"PATH": "/bin"}, discover=no_discovery)
    # Expect one light worker: threads, several deliveries at once, the GPUs hidden, no GPU discovery at all
    assert [(p.node, p.queues, p.gpus) for p in plans] == [("webhooks@%h", ("webhooks",), ())]
    (plan,) = plans
    assert (flag(plan, "-P"), flag(plan, "-c"), flag(plan, "-Q")) == ("threads", "8", "webhooks")
    assert plan.env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "", "REMAP_SIGTERM": "SIGQUIT"}
    # and the GPU and CPU workers never take deliveries: they would wait behind a shard
    assert all("webhooks" not in p.queues for p in plan_workers(settings(), gpus="0,1", discover=no_discovery))
    # Its thread count is a setting.
    (wider,) = plan_workers(settings(webhook_worker_threads=32), queues="webhooks", discover=no_discovery)
    assert flag(wider, "-c") == "32"
