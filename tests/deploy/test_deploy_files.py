"""deploy/: the Compose file, the Kubernetes manifests, the systemd units, the Dockerfile and the Grafana dashboard.

No Docker or cluster here: the files are parsed and held to what lmbatch needs — the services and GPU requests are
there, the migration runs before the API, every `LMBATCH_*` variable is a real setting (with a value it accepts),
and every metric the dashboard queries is one that lmbatch or Flower exports — and to their hardening: Redis asks
for a password that the URLs carry, only lmbatch's pods reach Redis and PostgreSQL, containers run without
privileges on a read-only root from pinned images, Flower listens on loopback unless a container needs otherwise,
Prometheus sends the metrics token, training checkpoints are out of the API's and Flower's reach, and the example
secrets are ones that the startup refusal catches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.cli.stack.launcher import flower_spec
from db.migrate import upgrade
from db.settings import ExampleSecretError, Settings, example_secrets, refuse_example_secrets

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
PROMETHEUS = DEPLOY / "prometheus"
# Where fine-tunes keep their runs and checkpoints, under LMBATCH_VAR_DIR (workers/shards/finetune_runner.py job_dir;
# not imported: it loads torch).
CHECKPOINTS = "finetune"
# An image reference pinned to a version: a tag with at least major.minor, never `latest`.
PINNED_IMAGE = re.compile(r"[\w./-]+:v?\d+\.\d+[\w.-]*")
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
    for kind, name in (
        ("Deployment", "lmbatch-api"),
        ("StatefulSet", "lmbatch-worker"),
        ("Deployment", "lmbatch-webhooks"),
    ):
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


def test_every_deployment_runs_a_webhook_worker_of_its_own() -> None:
    # Deliveries are served by a light worker that holds no GPU and mounts nothing, never by a GPU worker's queue
    webhooks = compose()["services"]["webhooks"]
    assert webhooks["command"] == ["worker", "--queues", "webhooks"]
    assert "deploy" not in webhooks and "volumes" not in webhooks
    assert webhooks["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert int(webhooks["stop_grace_period"].rstrip("s")) > 30
    deployment = manifest("Deployment", "lmbatch-webhooks")
    (container,) = containers(deployment)
    assert container["args"] == ["worker", "--queues", "webhooks"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert [c["name"] for c in containers(deployment, init=True)] == ["wait-for-migration"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    keys = unit(SYSTEMD / "lmbatch-webhooks.service")
    (exec_start,) = keys["ExecStart"]
    assert exec_start.endswith("lmbatch worker --queues webhooks")
    assert keys["KillMode"] == ["mixed"] and int(keys["TimeoutStopSec"][0]) > 30
    assert keys["ProtectSystem"] == ["strict"] and keys["PrivateDevices"] == ["true"] and "ReadWritePaths" not in keys


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
        _env_file=None,
        database_url=f"sqlite:///{var / 'm.db'}",
        var_dir=var,
        redis_url="redis://127.0.0.1:1/0",
        metrics_token="deploy-test-token",  # /metrics answers only its token
    )
    upgrade(settings)
    with TestClient(create_app(settings)) as client:
        return metric_names(client.get("/metrics", headers={"Authorization": "Bearer deploy-test-token"}).text)


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


# ------------------------------------------------------------------------------------------------ hardening


def compose_env_example() -> dict[str, str]:
    return env_file(DEPLOY / "env.example")


def render(value: str, variables: dict[str, str]) -> str:
    """A value as Compose renders it with ``variables`` (deploy/.env), else the defaults."""
    return INTERPOLATION.sub(lambda m: variables.get(m.group(1), m.group(3) if m.group(2) == "-" else ""), value)


def lmbatch_services() -> dict[str, dict[str, Any]]:
    """The Compose services that run the lmbatch image (the x-lmbatch anchor)."""
    return {name: svc for name, svc in compose()["services"].items() if "IMAGE" in str(svc.get("image"))}


def workloads() -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions In / NotIn / Exists / DoesNotExist) on ``labels``."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def settings_from(variables: dict[str, str]) -> Settings:
    return Settings(
        _env_file=None, **{k[len(PREFIX) :].lower(): v for k, v in variables.items() if k.startswith(PREFIX)}
    )


def test_every_image_is_pinned_to_a_version() -> None:
    kustomized = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    renamed = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in kustomized}
    images = {f"compose {name}": render(svc["image"], {}) for name, svc in compose()["services"].items()}
    for doc in workloads():
        for container in containers(doc) + containers(doc, init=True):
            images[f"k8s {doc['metadata']['name']}/{container['name']}"] = renamed.get(
                container["image"], container["image"]
            )
    text = (DEPLOY / "Dockerfile").read_text()
    versions = dict(re.findall(r"^ARG (\w+_VERSION)=(\S+)", text, re.M))
    # Every stage's base (the Python image, the node stage that installs the console's scripts)
    for number, base in enumerate(re.findall(r"^FROM (\S+)", text, re.M)):
        images[f"Dockerfile FROM #{number}"] = re.sub(r"\$\{(\w+)\}", lambda m: versions[m.group(1)], base)
    loose = {where: image for where, image in images.items() if not PINNED_IMAGE.fullmatch(image) or "latest" in image}
    assert not loose, f"images without a version: {loose}"


def test_k8s_pods_run_without_privileges_on_a_read_only_root() -> None:
    for doc in workloads():
        name = doc["metadata"]["name"]
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in containers(doc) + containers(doc, init=True):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert not context.get("privileged"), where
            if container["image"] == "lmbatch":  # HOME=/tmp in the image: caches need a writable /tmp
                volumes = {volume["name"]: volume for volume in pod["volumes"]}
                (tmp,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
                assert "emptyDir" in volumes[tmp["name"]], where


def test_compose_runs_lmbatch_without_privileges_on_a_read_only_root() -> None:
    services = compose()["services"]
    assert set(lmbatch_services()) >= {"migrate", "api", "flower", "gpu0", "gpu1"}
    for name, service in lmbatch_services().items():
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"], name
    for name, service in services.items():
        assert "no-new-privileges:true" in service["security_opt"], name
        assert not service.get("privileged") and not service.get("cap_add"), name
    assert "\nVOLUME" not in (DEPLOY / "Dockerfile").read_text()  # an anonymous volume would be writable


def test_redis_asks_for_a_password_and_every_redis_url_carries_it() -> None:
    # Compose: --requirepass from deploy/.env, required; the URL and the healthcheck use the same variable
    services, variables = compose()["services"], compose_env_example()
    command = services["redis"]["command"]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?.+\}", command[command.index("--requirepass") + 1])
    assert render(services["redis"]["environment"]["REDISCLI_AUTH"], variables) == variables["REDIS_PASSWORD"]
    for name, service in lmbatch_services().items():
        environment = {k: render(str(v), variables) for k, v in service["environment"].items()}
        assert urlsplit(environment["LMBATCH_REDIS_URL"]).password == variables["REDIS_PASSWORD"], name
        assert urlsplit(environment["LMBATCH_DATABASE_URL"]).password == variables["POSTGRES_PASSWORD"], name
    # Kubernetes: the same password in the server's args, its probe, and the URL; the URL is a secret
    secret = manifest("Secret", "lmbatch-secrets")["stringData"]
    (redis,) = containers(manifest("StatefulSet", "lmbatch-redis"))
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"] if "valueFrom" in e}
    assert from_secret["REDIS_PASSWORD"] == from_secret["REDISCLI_AUTH"]
    assert from_secret["REDIS_PASSWORD"] == {"name": "lmbatch-secrets", "key": "REDIS_PASSWORD"}
    assert urlsplit(secret["LMBATCH_REDIS_URL"]).password == secret["REDIS_PASSWORD"]
    assert urlsplit(secret["LMBATCH_DATABASE_URL"]).password == secret["POSTGRES_PASSWORD"]
    assert "LMBATCH_REDIS_URL" not in manifest("ConfigMap", "lmbatch-config")["data"]
    # systemd
    assert urlsplit(env_file(SYSTEMD / "lmbatch.env.example")["LMBATCH_REDIS_URL"]).password


def test_only_lmbatch_pods_that_need_them_reach_redis_and_postgres() -> None:
    policies = [doc for doc in manifests() if doc["kind"] == "NetworkPolicy"]
    pods = {doc["metadata"]["name"]: pod_labels(doc) for doc in workloads()}
    expected = {
        "lmbatch-redis": ({"lmbatch-api", "lmbatch-worker", "lmbatch-webhooks", "lmbatch-flower"}, 6379),
        "lmbatch-postgres": ({"lmbatch-migrate", "lmbatch-api", "lmbatch-worker", "lmbatch-webhooks"}, 5432),
    }
    for server, (clients, port) in expected.items():
        (policy,) = [p for p in policies if selects(p["spec"]["podSelector"], pods[server])]
        assert "Ingress" in policy["spec"]["policyTypes"], server
        allowed = set()
        for rule in policy["spec"]["ingress"]:
            assert rule["ports"] == [{"protocol": "TCP", "port": port}], server
            for peer in rule["from"]:
                # Pods of this namespace only: no namespaceSelector, no ipBlock
                assert set(peer) == {"podSelector"}, (server, peer)
                allowed |= {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
                # A pod that merely calls itself an API, without being lmbatch's, is not let in
                assert not selects(peer["podSelector"], {"app.kubernetes.io/component": "api"}), server
        assert allowed == clients, server


def test_flower_listens_on_loopback_unless_its_container_needs_otherwise(tmp_path: Path) -> None:
    # The setting's default, which the launcher passes to Flower
    settings = Settings(_env_file=None, flower_password="pw", flower_state_file=tmp_path / "flower.db")
    assert "--address=127.0.0.1" in flower_spec(settings, port=5555, env={}).argv
    opened = settings.model_copy(update={"flower_host": "0.0.0.0"})
    assert "--address=0.0.0.0" in flower_spec(opened, port=5555, env={}).argv
    # Set only on Flower's own container, where a port mapping or a Service must reach it
    services = compose()["services"]
    assert services["flower"]["environment"]["LMBATCH_FLOWER_HOST"] == "0.0.0.0"
    assert render(services["flower"]["ports"][0], {}).startswith("127.0.0.1:")  # published on the host's loopback
    others = [
        name
        for name, svc in services.items()
        if name != "flower" and "LMBATCH_FLOWER_HOST" in svc.get("environment", {})
    ]
    assert others == []
    (flower,) = containers(manifest("Deployment", "lmbatch-flower"))
    assert {e["name"]: e.get("value") for e in flower["env"]}["LMBATCH_FLOWER_HOST"] == "0.0.0.0"
    assert "LMBATCH_FLOWER_HOST" not in manifest("ConfigMap", "lmbatch-config")["data"]
    assert "LMBATCH_FLOWER_HOST" not in dockerfile_env()
    assert "LMBATCH_FLOWER_HOST" not in env_file(SYSTEMD / "lmbatch.env.example")


def test_metrics_need_the_token_and_prometheus_sends_it_from_a_file() -> None:
    # Every deployment sets a token (/metrics is closed without one) ...
    assert "LMBATCH_METRICS_TOKEN" in compose()["x-lmbatch"]["environment"]
    assert "LMBATCH_METRICS_TOKEN" in manifest("Secret", "lmbatch-secrets")["stringData"]
    assert "LMBATCH_METRICS_TOKEN" in env_file(SYSTEMD / "lmbatch.env.example")
    # ... and every scrape job of lmbatch's API sends it, read from a file rather than written in the config
    compose_config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    kubernetes_config = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())
    for config in (compose_config, kubernetes_config):
        (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "lmbatch"]
        assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
        assert "credentials" not in job["authorization"] and "bearer_token" not in job
    # Compose's Prometheus finds the token where the config says: the METRICS_TOKEN of deploy/.env, as a secret
    prometheus = compose()["services"]["prometheus"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    (secret,) = prometheus["secrets"]
    (job,) = [job for job in compose_config["scrape_configs"] if job["job_name"] == "lmbatch"]
    assert job["authorization"]["credentials_file"] == f"/run/secrets/{secret['target']}"
    assert compose()["secrets"][secret["source"]] == {"environment": "METRICS_TOKEN"}
    # An annotation-based scrape cannot send the token: the API's pods do not ask for one
    annotations = manifest("Deployment", "lmbatch-api")["spec"]["template"]["metadata"].get("annotations", {})
    assert "prometheus.io/scrape" not in annotations


def covers(mount: str, path: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(mount))


def test_training_checkpoints_are_out_of_reach_of_the_api_and_flower() -> None:
    var_dir = compose()["x-lmbatch"]["environment"]["LMBATCH_VAR_DIR"]
    checkpoints = f"{var_dir}/{CHECKPOINTS}"
    # Compose: only workers mount anything that holds the checkpoints; the API and Flower have a read-only root
    services = compose()["services"]
    mounting = {
        name for name, svc in services.items() for v in svc.get("volumes", []) if covers(v.split(":")[1], checkpoints)
    }
    assert mounting == {"gpu0", "gpu1"}
    assert services["api"]["read_only"] is True and services["flower"]["read_only"] is True
    # Kubernetes: the same, the shared volume reaching the API only through sub-directories other than the runs
    assert manifest("ConfigMap", "lmbatch-config")["data"]["LMBATCH_VAR_DIR"] == var_dir
    for kind, name in (("Deployment", "lmbatch-api"), ("Deployment", "lmbatch-flower")):
        for container in containers(manifest(kind, name)):
            for mount in container["volumeMounts"]:
                assert not covers(mount["mountPath"], checkpoints), (name, mount)
                assert not mount.get("subPath", "x").startswith(CHECKPOINTS), (name, mount)
    (worker,) = containers(manifest("StatefulSet", "lmbatch-worker"))
    assert any(covers(mount["mountPath"], checkpoints) for mount in worker["volumeMounts"])
    # systemd: everything is read-only (strict) but the paths each unit may write
    for name, may_write in (("lmbatch-api", False), ("lmbatch-flower", False), ("lmbatch-worker@", True)):
        keys = unit(SYSTEMD / f"{name}.service")
        assert keys["ProtectSystem"] == ["strict"], name
        writable = [path.lstrip("-") for line in keys["ReadWritePaths"] for path in line.split()]
        assert any(covers(path, f"/var/lib/lmbatch/{CHECKPOINTS}") for path in writable) is may_write, name


def test_the_example_secrets_are_ones_the_startup_refusal_catches() -> None:
    # Kubernetes: every secret of the example Secret, as an lmbatch container sees it
    config = manifest("ConfigMap", "lmbatch-config")["data"]
    secret = manifest("Secret", "lmbatch-secrets")["stringData"]
    settings = settings_from({**config, **secret})
    named = {"LMBATCH_DATABASE_URL", "LMBATCH_REDIS_URL", "LMBATCH_FLOWER_PASSWORD", "LMBATCH_METRICS_TOKEN"}
    assert set(example_secrets(settings)) == named
    with pytest.raises(ExampleSecretError, match="LMBATCH_REDIS_URL"):
        refuse_example_secrets(settings)
    refuse_example_secrets(settings.model_copy(update={"dev_mode": True}))  # a development machine may
    assert all(value.startswith("change-me") for key, value in secret.items() if key.endswith("PASSWORD"))
    # Compose, with deploy/.env copied from env.example as it is
    variables = compose_env_example()
    flower = {k: render(str(v), variables) for k, v in compose()["services"]["flower"]["environment"].items()}
    assert set(example_secrets(settings_from(flower))) == named
    assert all(variables[key].startswith("change-me") for key in variables if key.endswith(("PASSWORD", "TOKEN")))
    # systemd
    assert set(example_secrets(settings_from(env_file(SYSTEMD / "lmbatch.env.example")))) == named
