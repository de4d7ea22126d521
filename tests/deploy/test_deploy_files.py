"""deploy/: the Compose file, the Kubernetes manifests, the systemd units, the Dockerfile and the Grafana dashboard.

No Docker or cluster here: the files are parsed and held to what lmbatch needs — the services and GPU requests are
there, the migration runs before the API, every `LMBATCH_*` variable is a real setting (with a value it accepts),
and every metric the dashboard queries is one that lmbatch or Flower exports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from db.migrate import upgrade
from db.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
PREFIX = "LMBATCH_"
# ${VAR}, ${VAR:-default}, ${VAR:?message}: Compose's interpolation.
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


# ------------------------------------------------------------------------------------------------ helpers


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def interpolate(value: str) -> str:
    """A value as Compose would render it with the defaults and a placeholder for required variables."""
    return INTERPOLATION.sub(lambda m: m.group(3) if m.group(2) == "-" else "placeholder", value)


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def manifest(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def containers(workload: dict[str, Any], *, init: bool = False) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers" if init else "containers", []))


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def unit(path: Path) -> dict[str, list[str]]:
    """A systemd unit's keys (any section), each with its values in order: a key may repeat."""
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def dockerfile_env() -> dict[str, str]:
    logical, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#"):  # Docker drops comment lines, also inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    found: dict[str, str] = {}
    for line in logical:
        if line.startswith("ENV "):
            found.update(re.findall(r"(\w+)=(\S+)", line[4:]))
    return found


def assert_real_settings(variables: dict[str, str], where: str) -> None:
    """Every LMBATCH_* name is a Settings field, and Settings accepts the values as given."""
    ours = {name: value for name, value in variables.items() if name.startswith(PREFIX)}
    unknown = sorted(name for name in ours if name[len(PREFIX) :].lower() not in Settings.model_fields)
    assert not unknown, f"{where}: not settings of db/settings.py: {unknown}"
    Settings(_env_file=None, **{name[len(PREFIX) :].lower(): value for name, value in ours.items()})


# ----------------------------------------------------------------------------------------- Docker Compose


def test_compose_has_the_stack_and_one_worker_service_per_gpu() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "migrate", "api", "flower", "gpu0", "gpu1"} <= set(services)
    gpus = sorted(name for name in services if re.fullmatch(r"gpu\d+", name))
    for name in gpus:
        worker = services[name]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        # Each reserves its own host GPU, which the container sees as index 0 and pins with --gpus 0.
        assert device["device_ids"] == [name[3:]] and "gpu" in device["capabilities"], name
        assert worker["command"] == ["worker", "--gpus", "0"], name
        # The launcher SIGKILLs its worker 30 s after SIGTERM; Docker must wait longer.
        assert int(worker["stop_grace_period"].rstrip("s")) > 30
    reserved = [services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for name in gpus]
    assert len(set(reserved)) == len(gpus)


def test_compose_redis_persists_to_an_append_only_file_on_a_volume() -> None:
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_compose_runs_the_migration_before_the_api_and_the_workers() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "gpu0", "gpu1"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def test_compose_flower_gets_basic_auth_credentials_from_the_environment() -> None:
    flower = compose()["services"]["flower"]
    assert flower["command"][0] == "flower"
    environment = flower["environment"]
    # Required (":?"): Compose refuses to start without a password rather than run Flower open.
    assert re.fullmatch(r"\$\{FLOWER_PASSWORD:\?.+\}", environment["LMBATCH_FLOWER_PASSWORD"])
    assert environment["LMBATCH_FLOWER_USER"].startswith("${FLOWER_USER")


def test_every_lmbatch_variable_compose_sets_is_a_real_setting() -> None:
    for name, service in compose()["services"].items():
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: environment as a mapping, please"
        assert_real_settings({k: interpolate(str(v)) for k, v in environment.items()}, f"compose.yaml {name}")
    text = (DEPLOY / "compose.yaml").read_text()
    interpolated = {m.group(1): "1" for m in INTERPOLATION.finditer(text) if m.group(1).startswith(PREFIX)}
    assert_real_settings({k: v for k, v in env_file(DEPLOY / "env.example").items()}, "env.example")
    assert not [k for k in interpolated if k[len(PREFIX) :].lower() not in Settings.model_fields]


# ----------------------------------------------------------------------------------------------- Dockerfile


def test_the_image_runs_lmbatch_and_its_environment_is_real_settings() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["lmbatch"]' in text
    assert "constraints.txt" in text  # the pinned versions, torch included
    variables = dockerfile_env()
    assert variables["LMBATCH_API_HOST"] == "0.0.0.0"  # else the API and Flower listen on the container's loopback
    assert_real_settings(variables, "Dockerfile")


# ----------------------------------------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_has_the_api_flower_and_gpu_workers_with_their_services() -> None:
    api = manifest("Deployment", "lmbatch-api")
    manifest("Service", "lmbatch-api")
    flower = manifest("Deployment", "lmbatch-flower")
    manifest("Service", "lmbatch-flower")
    worker = manifest("StatefulSet", "lmbatch-worker")
    (api_container,) = containers(api)
    assert api_container["args"] == ["api"]
    (flower_container,) = containers(flower)
    assert flower_container["args"][0] == "flower"
    (worker_container,) = containers(worker)
    assert worker_container["args"] == ["worker", "--gpus", "0"]
    assert worker_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    # Database and broker: bundled StatefulSets (or managed services named in the ConfigMap and Secret)
    manifest("StatefulSet", "lmbatch-postgres")
    redis = manifest("StatefulSet", "lmbatch-redis")
    args = containers(redis)[0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"


def test_k8s_api_and_workers_wait_for_the_migration_job() -> None:
    job = manifest("Job", "lmbatch-migrate")
    (migrate,) = containers(job)
    assert migrate["args"] == ["db", "upgrade"]
    for kind, name in (("Deployment", "lmbatch-api"), ("StatefulSet", "lmbatch-worker")):
        waits = [" ".join(c["command"]) for c in containers(manifest(kind, name), init=True)]
        assert any("--for=condition=complete job/lmbatch-migrate" in command for command in waits), name
        assert manifest(kind, name)["spec"]["template"]["spec"]["serviceAccountName"] == "lmbatch"
    role = manifest("Role", "lmbatch-wait-for-migration")
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]}]


def test_every_lmbatch_variable_the_manifests_set_is_a_real_setting() -> None:
    config = manifest("ConfigMap", "lmbatch-config")["data"]
    secret = manifest("Secret", "lmbatch-secrets")["stringData"]
    assert "LMBATCH_DATABASE_URL" in secret and "LMBATCH_FLOWER_PASSWORD" in secret
    assert_real_settings({**config, **secret}, "k8s ConfigMap + Secret")
    for doc in manifests():
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in containers(doc) + containers(doc, init=True):
            inline = {e["name"]: str(e.get("value", "x")) for e in container.get("env", [])}
            assert_real_settings(inline, f"{doc['metadata']['name']}/{container['name']}")
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                assert ref["name"] in ("lmbatch-config", "lmbatch-secrets"), ref


# -------------------------------------------------------------------------------------------------- systemd


def test_systemd_worker_template_pins_one_gpu_per_instance_and_stops_softly() -> None:
    worker = unit(SYSTEMD / "lmbatch-worker@.service")
    (exec_start,) = worker["ExecStart"]
    assert exec_start.endswith("lmbatch worker --gpus %i")
    # SIGTERM to the launcher only: it makes it a soft shutdown; control-group would kill the pool process at once.
    assert worker["KillMode"] == ["mixed"] and int(worker["TimeoutStopSec"][0]) > 30


def test_systemd_api_starts_after_the_migration_unit() -> None:
    api = unit(SYSTEMD / "lmbatch-api.service")
    migrate = unit(SYSTEMD / "lmbatch-migrate.service")
    assert "lmbatch-migrate.service" in api["Requires"][0]
    assert any("lmbatch-migrate.service" in after for after in api["After"])
    assert migrate["Type"] == ["oneshot"] and migrate["ExecStart"][0].endswith("lmbatch db upgrade")
    assert api["ExecStart"][0].endswith("lmbatch api")
    for path in SYSTEMD.glob("*.service"):
        assert unit(path)["EnvironmentFile"] == ["/etc/lmbatch/lmbatch.env"], path.name
    assert_real_settings(env_file(SYSTEMD / "lmbatch.env.example"), "lmbatch.env.example")


# -------------------------------------------------------------------------------------------------- Grafana


def metric_names(text: str) -> set[str]:
    """Every sample name a Prometheus text exposition can hold, counters' _total and histograms' series included."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    return names


@pytest.fixture(scope="module")
def lmbatch_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names lmbatch's /metrics really exports, scraped from the app on an empty database."""
    var = tmp_path_factory.mktemp("metrics")
    # Nothing listens on port 1: the Redis gauges are still declared, without samples.
    settings = Settings(
        _env_file=None, database_url=f"sqlite:///{var / 'm.db'}", var_dir=var, redis_url="redis://127.0.0.1:1/0"
    )
    upgrade(settings)
    with TestClient(create_app(settings)) as client:
        return metric_names(client.get("/metrics").text)


@pytest.fixture(scope="module")
def flower_metrics() -> set[str]:
    from flower.events import get_prometheus_metrics

    names = set()
    for metric in vars(get_prometheus_metrics()).values():
        for family in metric.describe():
            names.add(family.name)
            names.update(family.name + s for s in ("_total", "_bucket", "_sum", "_count"))
    return names


def dashboard_queries() -> Iterator[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "lmbatch.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_the_dashboard_queries_only_metrics_that_exist(lmbatch_metrics: set[str], flower_metrics: set[str]) -> None:
    used: set[str] = set()
    for title, expr in dashboard_queries():
        for name in re.findall(r"\b(?:lmbatch|flower)_[a-z0-9_]+", expr):
            assert name in lmbatch_metrics | flower_metrics, f"{title}: {name} is exported by neither"
            used.add(name)
    expected = {
        "lmbatch_jobs", "lmbatch_items_processed_total", "lmbatch_tokens_generated_total",
        "lmbatch_shard_duration_seconds_bucket", "lmbatch_queue_depth", "lmbatch_workers_online",
        "flower_events_total", "flower_task_runtime_seconds_bucket", "flower_worker_online",
    }  # fmt: skip
    assert expected <= used, expected - used


def test_the_dashboard_is_importable_json_with_unique_panel_ids() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "lmbatch.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["title"] == "lmbatch"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"], panel["title"]
