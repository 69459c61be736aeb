"""deploy/, the Dockerfile and docker-compose.yml: they cannot run here (no Docker engine, no
cluster), so check what can be checked: schemas, a Dockerfile linter, that dashboards and alerts
parse as PromQL and use only metrics the relay exports, that probes and ports match the
settings, that every secret reference resolves, and that the image's health check works against
a real endpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from cdc_relay.adapters.http import HEARTBEAT_STALE_SECONDS, MetricsServer
from cdc_relay.adapters.metrics import METRIC_NAMES, registry_for
from cdc_relay.core.stats import RelayStats
from cdc_relay.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
DEFAULT_PORT = Settings.model_fields["http_port"].default
METRIC = re.compile(r"\bcdc_relay_[a-z0-9_]+")


def metric_names(expr: str) -> set[str]:
    """The relay metrics an expression uses; it must parse as PromQL (Grafana's variables are
    replaced by values first)."""
    concrete = expr.replace("$__rate_interval", "5m").replace("$job", ".*")
    promql_parser.parse(concrete.replace("$instance", ".*"))
    return set(METRIC.findall(expr))


def test_the_grafana_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "cdc-relay.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*(metric_names(e) for e in exprs))
    # Variables use Grafana's label_values(), not PromQL: their metric names only.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= set(METRIC.findall(variable["query"]))
    assert used <= METRIC_NAMES, used - METRIC_NAMES
    for needed in (
        "cdc_relay_events_published_total",
        "cdc_relay_replication_lag_bytes",
        "cdc_relay_end_to_end_latency_seconds_bucket",
        "cdc_relay_in_flight_events",
        "cdc_relay_slot_wal_status",
    ):
        assert needed in used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_alert_rules_use_only_exported_metrics_and_cover_the_risks():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for name, rule in alerts.items():
        assert metric_names(rule["expr"]) <= METRIC_NAMES, name
        assert rule["annotations"]["summary"] and rule["labels"]["severity"]
    by_metric = {m: name for name, rule in alerts.items() for m in metric_names(rule["expr"])}
    assert "cdc_relay_replication_lag_bytes" in by_metric
    assert "cdc_relay_slot_wal_status" in by_metric
    assert "cdc_relay_events_dead_lettered_total" in by_metric
    no_acks = metric_names(alerts["CdcRelayNoAcksWhileLagGrows"]["expr"])
    assert {"cdc_relay_last_ack_timestamp_seconds", "cdc_relay_replication_lag_bytes"} <= no_acks


def k8s_documents(pattern: str = "*.yaml") -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob(pattern)):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def secret_keys() -> dict[str, set[str]]:
    return {
        d["metadata"]["name"]: set(d["stringData"])
        for d in k8s_documents()
        if d["kind"] == "Secret"
    }


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def test_the_k8s_sidecar_probes_and_secrets_match_the_relay():
    docs = [*k8s_documents("deployment.yaml"), *k8s_documents("setup-job.yaml")]
    secrets = secret_keys()
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    relay = next(c for c in containers(deployment) if c["name"] == "cdc-relay")
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    env = {e["name"]: e.get("value") for e in relay["env"]}
    port = int(env.get("CDC_RELAY_HTTP_PORT") or DEFAULT_PORT)
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    probes = [
        relay[name] for name in ("livenessProbe", "readinessProbe", "startupProbe") if name in relay
    ]
    for probe in probes:
        assert ports[probe["httpGet"]["port"]] == port
    assert relay["args"] == ["run"]
    pod = deployment["spec"]["template"]["spec"]
    assert (
        pod["terminationGracePeriodSeconds"]
        > Settings.model_fields["shutdown_timeout_seconds"].default
    )
    job = next(d for d in docs if d["kind"] == "Job")
    assert containers(job)[0]["args"][0] == "setup"
    # Every secretKeyRef names a key of a Secret defined here; the database URL is never inline.
    refs = 0
    for doc in (deployment, job):
        for container in containers(doc):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs += 1
                    assert ref["key"] in secrets[ref["name"]], ref
                assert not (item["name"].endswith("DATABASE_URL") and "value" in item)
    assert refs >= 3


def rollout_blockers(doc: dict[str, Any]) -> list[str]:
    """Why a workload running the relay could never finish a rollout: a rolling update starts
    the new pod while the old one holds the slot, and /readyz answers 503 for a hot standby."""
    if doc.get("kind") not in ("Deployment", "StatefulSet"):
        return []
    strategy = doc["spec"].get("strategy", doc["spec"].get("updateStrategy", {}))
    rolling = strategy.get("type", "RollingUpdate") == "RollingUpdate"
    blockers = []
    for container in containers(doc):
        runs_relay = "cdc-relay" in container.get("image", "") and "run" in container.get(
            "args", ["run"]
        )
        probe = container.get("readinessProbe", {}).get("httpGet", {})
        if runs_relay and rolling and probe.get("path") == "/readyz":
            blockers.append(
                f"{doc['metadata']['name']}/{container['name']}: readiness on /readyz with a "
                "rolling update: the new pod's relay is a hot standby until the old one stops, "
                "so it never becomes ready and the rollout hangs"
            )
    return blockers


def test_the_k8s_workloads_can_roll_out():
    """Bug 8: the example Deployment could never roll out (readiness on /readyz, 503 for the
    new pod's hot-standby relay, while the old pod held the slot)."""
    docs = k8s_documents()
    assert [b for doc in docs for b in rollout_blockers(doc)] == []
    # The check itself catches the broken form.
    deployment = next(d for d in k8s_documents("deployment.yaml") if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    relay = next(c for c in containers(broken) if c["name"] == "cdc-relay")
    relay["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "relay-metrics"}}
    assert rollout_blockers(broken)
    del broken["spec"]["strategy"]  # RollingUpdate is also the default
    assert rollout_blockers(broken)


SETTING_NAMES = {f"CDC_RELAY_{name.upper()}" for name in Settings.model_fields}
_PARTITIONS = re.compile(r"SET cdc_relay\.partitions = (\d+)")
Share = tuple[str, str, str]  # what one relay streams: outbox table, slot, publication


def env_values(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def share_of(container: dict[str, Any]) -> Share:
    """The table, slot and publication a relay container is configured for (the defaults
    where unset)."""
    env = env_values(container)
    fields = Settings.model_fields

    def get(name: str) -> str:
        return env.get(f"CDC_RELAY_{name.upper()}") or str(fields[name].default)

    return get("outbox_table"), get("slot_name"), get("publication_name")


def runs_relay(container: dict[str, Any]) -> bool:
    return "cdc-relay" in container.get("image", "") and container.get("args", ["run"]) == ["run"]


def scale_out_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Why a scale-out example would lose or duplicate events: a partition of the recipe
    (sql/outbox_hash.sql, its count set by the setup Job) without a relay, two workloads on one
    slot, publication or partition, a relay whose slot the Job never sets up, or topic
    templates that would split an aggregate's events."""
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    steps = [*pod.get("initContainers", []), *pod["containers"]]
    counts = [int(m) for c in steps for m in _PARTITIONS.findall(" ".join(c.get("args", [])))]
    assert len(counts) == 1, "the Job must create the hash-partitioned outbox once"
    partitions = {f"public.outbox_p{i}" for i in range(counts[0])}
    set_up = {share_of(c) for c in steps if c.get("args", [])[:1] == ["setup"]}

    relays: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in containers(doc):
                if runs_relay(container):
                    relays[f"{doc['metadata']['name']}/{container['name']}"] = container
    problems = []
    for i, what in enumerate(("partition", "slot", "publication")):
        owners: dict[str, list[str]] = {}
        for name, container in relays.items():
            owners.setdefault(share_of(container)[i], []).append(name)
        problems += [
            f"{what} {value} is shared by {', '.join(names)}"
            for value, names in owners.items()
            if len(names) > 1
        ]
    tables = {share_of(c)[0] for c in relays.values()}
    problems += [f"partition {t} has no relay" for t in sorted(partitions - tables)]
    problems += [f"{t} is not a partition of the recipe's outbox" for t in tables - partitions]
    for name, container in relays.items():
        if share_of(container) not in set_up:
            problems.append(f"{name}: the setup Job never sets up {share_of(container)}")
    templates = {env_values(c).get("CDC_RELAY_TOPIC_TEMPLATE") for c in relays.values()}
    if len(templates) > 1 or any("{table}" in (t or "") for t in templates):
        problems.append(
            f"topic templates {sorted(map(str, templates))}: every relay needs the same one, "
            "without {table}, so that an aggregate's events go to one topic"
        )
    return problems


def test_the_scale_out_example_gives_every_partition_exactly_one_relay():
    docs = k8s_documents("scale-out.yaml")
    assert scale_out_problems(docs) == []
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 4
    # Overlapping selectors would make the Deployments fight over each other's pods.
    selectors = {frozenset(d["spec"]["selector"]["matchLabels"].items()) for d in deployments}
    assert len(selectors) == len(deployments)
    # The check itself catches the broken forms.
    shared = json.loads(json.dumps(docs))
    relay = containers(shared[2])[0]
    for item in relay["env"]:
        if item["name"] == "CDC_RELAY_SLOT_NAME":
            item["value"] = "cdc_relay_p0"
    assert any("slot cdc_relay_p0 is shared" in p for p in scale_out_problems(shared))
    assert any("never sets up" in p for p in scale_out_problems(shared))
    missing = [d for d in docs if d["metadata"]["name"] != "cdc-relay-p3"]
    assert scale_out_problems(missing) == ["partition public.outbox_p3 has no relay"]
    by_table = json.loads(json.dumps(docs))
    containers(by_table[1])[0]["env"].append(
        {"name": "CDC_RELAY_TOPIC_TEMPLATE", "value": "outbox.{table}.{aggregate_type}"}
    )
    assert any("topic templates" in p for p in scale_out_problems(by_table))


def test_the_scale_out_relays_have_the_sidecars_probes_secrets_and_settings():
    secrets = secret_keys()
    docs = k8s_documents("scale-out.yaml")
    job = next(d for d in docs if d["kind"] == "Job")
    (create,) = [c for c in job["spec"]["template"]["spec"]["initContainers"] if c.get("command")]
    assert create["command"] == ["python", "-c"]
    compile(create["args"][0], "outbox-table", "exec")  # at least valid Python
    assert 'recipes.read("outbox_hash.sql")' in create["args"][0]
    for doc in docs:
        pod = doc["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            for item in container.get("env", []):
                # Every variable is one the relay reads: a typo would silently fall back to
                # the default slot, shared by every relay.
                assert item["name"] in SETTING_NAMES, item["name"]
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], ref
                assert not (item["name"].endswith("DATABASE_URL") and "value" in item)
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
        if doc["kind"] != "Deployment":
            continue
        assert doc["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        assert (
            pod["terminationGracePeriodSeconds"]
            > Settings.model_fields["shutdown_timeout_seconds"].default
        )
        (relay,) = pod["containers"]
        assert runs_relay(relay)
        ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
        port = int(env_values(relay).get("CDC_RELAY_HTTP_PORT") or DEFAULT_PORT)
        assert "readinessProbe" not in relay
        for probe in ("livenessProbe", "startupProbe"):
            assert relay[probe]["httpGet"]["path"] == "/healthz"
            assert ports[relay[probe]["httpGet"]["port"]] == port
        assert doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert set(doc["spec"]["selector"]["matchLabels"].items()) <= set(
            doc["spec"]["template"]["metadata"]["labels"].items()
        )


def test_compose_file_matches_the_compose_spec_and_the_relay():
    path = ROOT / "docker-compose.yml"
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    services = yaml.safe_load(path.read_text())["services"]
    assert "wal_level=logical" in services["postgres"]["command"]
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["relay-setup"]["command"][0] == "setup"
    relay = services["relay"]
    assert relay["depends_on"]["relay-setup"]["condition"] == "service_completed_successfully"
    assert relay["depends_on"]["kafka"]["condition"] == "service_healthy"
    port = int(relay["environment"]["CDC_RELAY_HTTP_PORT"])
    assert f"{port}:{port}" in relay["ports"] and port == DEFAULT_PORT
    assert f":{port}/healthz" in " ".join(relay["healthcheck"]["test"])


def dockerfile_instructions() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found[word.upper()] = rest.strip()
    return found


def test_the_dockerfile_passes_hadolint_and_runs_as_a_numeric_user():
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    instructions = dockerfile_instructions()
    assert instructions["FROM"].startswith("python:3.12-slim")
    assert instructions["USER"].isdigit() and instructions["USER"] != "0"
    assert json.loads(instructions["ENTRYPOINT"]) == ["cdc-relay"]
    assert json.loads(instructions["CMD"]) == ["run"]


def test_the_image_healthcheck_command_follows_healthz():
    health = dockerfile_instructions()["HEALTHCHECK"]
    command = json.loads(health[health.index("CMD") + 3 :].strip())
    assert command[0] == "python"
    stats = RelayStats()
    server = MetricsServer("127.0.0.1", 0, stats, registry_for(stats, slot="s", publication="p"))
    server.start()
    try:
        env = {**os.environ, "CDC_RELAY_HTTP_PORT": str(server.port)}
        argv = [sys.executable, *command[1:]]
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
        stats.heartbeat -= HEARTBEAT_STALE_SECONDS + 1
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        server.stop()
    disabled = {**os.environ, "CDC_RELAY_HTTP_PORT": "0"}
    argv = [sys.executable, *command[1:]]
    assert subprocess.run(argv, env=disabled, capture_output=True, timeout=30).returncode == 0
