"""The Helm chart, rendered by the real helm binary: the sidecar forms, probes, security context,
data volume, restart checksum, monitoring objects; built-in objects checked by kubernetes-validate
(--strict), the Prometheus Operator CRDs field by field."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config.model import MainConfig
from proxy.reload import RESTART_ONLY
from tests.conftest import Launch, free_port, loopback_policy
from tests.helm import (
    CHART,
    NATIVE_SIDECAR_MINIMUM,
    OLDEST_SCHEMA,
    ROOT,
    Doc,
    build_example,
    helm,
    one,
    pod_spec,
    render,
    render_error,
    sidecar,
    validate_builtin,
)

MONITORING = {
    "config": {"admin": {"host": "0.0.0.0", "port": 15000}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "selector": {"app.kubernetes.io/name": "example-app"}},
        "prometheusRule": {
            "enabled": True,
            "runbookBaseUrl": "https://git.example.com/outrigger/docs/sre.md",
        },
        "grafanaDashboard": {"enabled": True},
    },
}


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("example"))


def outrigger(values: dict[str, Any]) -> dict[str, Any]:
    """Values for the example app chart: these under `outrigger:`."""
    return {"outrigger": values}


def test_helm_lint_passes_for_the_chart_and_the_example(example: Path) -> None:
    for chart in (CHART, example):
        result = helm("lint", "--strict", chart)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_renders_strictly_valid_objects_with_a_native_sidecar(example: Path) -> None:
    docs = render(example)
    assert validate_builtin(docs, NATIVE_SIDECAR_MINIMUM) == ["ConfigMap", "Service", "Deployment"]
    container = pod_spec(docs)["initContainers"][0]
    assert container["name"] == "outrigger"
    assert container["restartPolicy"] == "Always"
    assert "lifecycle" not in container
    assert [c["name"] for c in pod_spec(docs)["containers"]] == ["app"]


def test_the_classic_sidecar_is_a_container_that_sleeps_before_sigterm(example: Path) -> None:
    docs = render(example, outrigger({"nativeSidecar": False, "classicSidecar": {"preStopSleepSeconds": 7}}))
    validate_builtin(docs, OLDEST_SCHEMA)  # no native-sidecar field: older clusters accept it
    spec = pod_spec(docs)
    assert "initContainers" not in spec
    container = sidecar(docs)
    assert container in spec["containers"]
    assert "restartPolicy" not in container
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[-1] == "import time; time.sleep(7)"


def test_the_container_is_locked_down(example: Path) -> None:
    context = sidecar(render(example))["securityContext"]
    assert context == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe_url(probe: Doc) -> str:
    (url,) = re.findall(r"'(http://[^']+)'", probe["exec"]["command"][-1])
    return str(url)


def test_probes_exec_inside_the_pod_against_the_loopback_admin_listener(example: Path) -> None:
    container = sidecar(render(example, outrigger({"config": {"admin": {"host": "0.0.0.0", "port": 15900}}})))
    assert _probe_url(container["livenessProbe"]) == "http://127.0.0.1:15900/healthz"
    assert _probe_url(container["readinessProbe"]) == "http://127.0.0.1:15900/readyz"
    assert _probe_url(container["startupProbe"]) == "http://127.0.0.1:15900/readyz"
    assert container["ports"] == [{"name": "outrigger-admin", "containerPort": 15900}]


def test_http_get_probes_use_the_named_admin_port(example: Path) -> None:
    container = sidecar(render(example, outrigger({"probes": {"mode": "httpGet"}})))
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "outrigger-admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "outrigger-admin"}


def _run_probe(probe: Doc) -> int:
    command = [sys.executable, *probe["exec"]["command"][1:]]
    return subprocess.run(command, capture_output=True, timeout=10, check=False).returncode


async def test_the_rendered_config_runs_and_the_rendered_probes_pass_against_it(
    tmp_path: Path, launch: Launch
) -> None:
    """The ConfigMap's files, written out as the volume lays them, start a real Outrigger; the
    probe commands the chart renders succeed against it, and fail while nothing listens."""
    admin, main = free_port(), free_port()
    values = {
        "config": {"admin": {"port": admin}, "listen": {"port": main}},
        "policies": {"upstream.yaml": loopback_policy("http://127.0.0.1:9")},
    }
    docs = render(CHART, values)
    data = one(docs, "ConfigMap")["data"]
    (tmp_path / "policies").mkdir()
    (tmp_path / "config.yaml").write_text(data["config.yaml"])
    (tmp_path / "policies" / "upstream.yaml").write_text(data["policy.upstream.yaml"])

    container = sidecar(render(build_example(tmp_path), outrigger(values)))
    probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert [_run_probe(p) for p in probes] == [1, 1, 1]
    process = launch(tmp_path / "config.yaml")
    await process.wait_ready()
    assert [_run_probe(p) for p in probes] == [0, 0, 0]


def _volume(docs: list[Doc], name: str) -> Doc | None:
    return next((v for v in pod_spec(docs)["volumes"] if v["name"] == name), None)


def test_data_dir_is_an_empty_dir_by_default_mounted_writable(example: Path) -> None:
    docs = render(example)
    mounts = {m["name"]: m for m in sidecar(docs)["volumeMounts"]}
    assert mounts["outrigger-data"] == {"name": "outrigger-data", "mountPath": "/var/lib/outrigger"}
    assert mounts["outrigger-config"]["readOnly"] is True
    assert _volume(docs, "outrigger-data") == {"name": "outrigger-data", "emptyDir": {"sizeLimit": "1Gi"}}


def test_data_dir_on_an_existing_claim_a_created_claim_or_a_volume_of_the_app(example: Path) -> None:
    existing = render(
        example,
        outrigger(
            {"data": {"volume": "persistentVolumeClaim", "persistentVolumeClaim": {"claimName": "store"}}}
        ),
    )
    assert _volume(existing, "outrigger-data") == {
        "name": "outrigger-data",
        "persistentVolumeClaim": {"claimName": "store"},
    }
    assert not [d for d in existing if d["kind"] == "PersistentVolumeClaim"]

    pvc = {"create": True, "size": "5Gi", "storageClassName": "fast"}
    created = render(
        example, outrigger({"data": {"volume": "persistentVolumeClaim", "persistentVolumeClaim": pvc}})
    )
    validate_builtin(created, NATIVE_SIDECAR_MINIMUM)
    claim = one(created, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "r-outrigger-data"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast",
        "resources": {"requests": {"storage": "5Gi"}},
    }
    assert _volume(created, "outrigger-data") == {
        "name": "outrigger-data",
        "persistentVolumeClaim": {"claimName": "r-outrigger-data"},
    }

    external = render(example, outrigger({"data": {"volume": "external"}}))
    assert _volume(external, "outrigger-data") is None
    assert "outrigger-data" in {m["name"] for m in sidecar(external)["volumeMounts"]}


def test_bad_data_settings_fail_the_render(example: Path) -> None:
    assert "data.volume must be" in render_error(example, outrigger({"data": {"volume": "hostPath"}}))
    no_claim = outrigger({"data": {"volume": "persistentVolumeClaim"}})
    assert "needs data.persistentVolumeClaim.claimName or create: true" in render_error(example, no_claim)
    elsewhere = {"config": {"data_dir": "/data"}}
    assert "must be data.mountPath (/var/lib/outrigger)" in render_error(CHART, elsewhere)


def test_the_default_config_puts_data_dir_on_the_data_volume_once_the_proxy_knows_the_key() -> None:
    config = yaml.safe_load(one(render(CHART), "ConfigMap")["data"]["config.yaml"])
    if "data_dir" in MainConfig.model_fields:  # SPEC 11: the default (beside the config) is read-only here
        assert config["data_dir"] == "/var/lib/outrigger"
    else:
        assert "data_dir" not in config  # the proxy would refuse an unknown key


def _checksum(example: Path, config: dict[str, Any] | None = None, **values: Any) -> str:
    docs = render(example, outrigger({"config": config or {}, **values}))
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    checksum: str = annotations["checksum/outrigger-restart"]
    return checksum


def _changed(key: str) -> dict[str, Any]:
    """`config` values that change `key` (a section gets one more key: Helm merges maps)."""
    default = MainConfig().model_dump(mode="json")[key]
    return {key: {**default, "changed": 1} if isinstance(default, dict) else "changed"}


def test_only_a_restart_only_config_change_rolls_the_pods(example: Path) -> None:
    """The pod annotation hashes the keys the proxy cannot hot-reload: a change of one of them
    changes it (a rolling restart applies it); config the proxy reloads in place does not."""
    before = _checksum(example)
    for key in set(RESTART_ONLY) - {"data_dir"}:
        assert _checksum(example, _changed(key)) != before, key
    moved_data = _checksum(example, {"data_dir": "/data"}, data={"mountPath": "/data"})
    assert moved_data != before, "data_dir"  # (the chart insists it is the data volume's mount path)
    for key in set(MainConfig.model_fields) - set(RESTART_ONLY) - {"webhooks"}:
        assert _checksum(example, _changed(key)) == before, key
    routes = {"routes": [{"path": "/hooks/x", "forward": "http://127.0.0.1:8000/x"}]}
    with_webhooks = _checksum(example, {"webhooks": routes})
    assert with_webhooks != before  # the section opens a listener
    moved = _checksum(example, {"webhooks": {**routes, "listen": {"port": 15003}}})
    assert moved != with_webhooks, "webhooks.listen is restart-only"
    other_routes = {"routes": [{"path": "/hooks/y", "forward": "http://127.0.0.1:8000/y"}]}
    assert _checksum(example, {"webhooks": other_routes}) == with_webhooks, "routes reload live"
    assert _checksum(example, policies={"extra.yaml": {"hosts": ["api.example.com"]}}) == before
    assert _checksum(example, {"brand_new_key": 1}) != before  # unknown to the chart: assume restart


def test_the_service_port_monitor_and_container_port_share_one_name(example: Path) -> None:
    docs = render(example, outrigger(MONITORING))
    assert validate_builtin(docs, NATIVE_SIDECAR_MINIMUM) == [
        "ConfigMap",
        "ConfigMap",
        "Service",
        "Deployment",
    ]
    (service_port,) = (p for p in one(docs, "Service")["spec"]["ports"] if p["name"] == "outrigger-admin")
    assert service_port == {
        "name": "outrigger-admin",
        "port": 15000,
        "targetPort": "outrigger-admin",
        "protocol": "TCP",
    }
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "example-app"}}
    assert monitor["spec"]["endpoints"] == [
        {"port": "outrigger-admin", "path": "/metrics", "interval": "30s"}
    ]
    assert one(docs, "Service")["metadata"]["labels"]["app.kubernetes.io/name"] == "example-app"


def test_a_service_monitor_needs_a_reachable_admin_listener_and_a_selector() -> None:
    loopback = {"metrics": {"serviceMonitor": {"enabled": True, "selector": {"app": "x"}}}}
    assert "set config.admin.host (now 127.0.0.1) to 0.0.0.0" in render_error(CHART, loopback)
    no_selector = {**MONITORING, "metrics": {"serviceMonitor": {"enabled": True}}}
    assert "metrics.serviceMonitor.selector must match" in render_error(CHART, no_selector)


def _github_anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub makes them: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_has_a_severity_a_duration_and_a_runbook_section_in_sre_md() -> None:
    rule = one(render(CHART, MONITORING), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = rule["spec"]["groups"]
    anchors = _github_anchors((ROOT / "docs" / "sre.md").read_text())
    names = []
    for alert in group["rules"]:
        names.append(alert["alert"])
        assert set(alert) == {"alert", "expr", "for", "labels", "annotations"}, alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}
        base, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert base == "https://git.example.com/outrigger/docs/sre.md"
        assert anchor == alert["alert"].lower()
        assert anchor in anchors, alert["alert"]
        assert alert["expr"].count("(") == alert["expr"].count(")"), alert["alert"]
    assert names == [
        "OutriggerCircuitOpen",
        "OutriggerRejectionRatioHigh",
        "OutriggerRetryBudgetExhausted",
        "OutriggerDeadDeliveries",
        "OutriggerFleetBackendDown",
    ]


def test_alert_rules_need_the_published_runbook_location() -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True}}}
    assert "set metrics.prometheusRule.runbookBaseUrl" in render_error(CHART, values)


def test_the_dashboard_config_map_carries_the_dashboard_file() -> None:
    (dashboard,) = (d for d in render(CHART, MONITORING) if d["metadata"]["name"] == "r-outrigger-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "outrigger.json").read_text())
    assert json.loads(dashboard["data"]["outrigger.json"]) == shipped


def test_monitoring_objects_are_off_by_default() -> None:
    assert [d["kind"] for d in render(CHART)] == ["ConfigMap"]


def test_policy_file_names_are_checked() -> None:
    assert "must be a plain name ending in .yaml" in render_error(CHART, {"policies": {"../x.yaml": {}}})
