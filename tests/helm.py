"""The Helm chart rendered by the real `helm` binary (scripts/get-helm.py installs it beside the
venv's python), and the rendered objects checked by kubernetes-validate."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "outrigger"
EXAMPLE = CHART / "examples" / "app"
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}
"""Prometheus Operator CRDs: kubernetes-validate has no schema for them (the tests check their fields)."""
NATIVE_SIDECAR_MINIMUM = "1.29.0"
"""The oldest Kubernetes with native sidecars (an init container with restartPolicy: Always)."""
OLDEST_SCHEMA = "1.25.0"
"""The oldest version kubernetes-validate knows: the classic sidecar form must validate there."""

Doc = dict[str, Any]


def helm_binary() -> Path:
    helm = Path(sys.executable).parent / "helm"
    if not helm.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "get-helm.py"), str(helm.parent)], check=True)
    return helm


def helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=False, timeout=60)


def _template(chart: Path, values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values, file)
        file.flush()
        return helm("template", "r", chart, "--namespace", "payments", "-f", file.name)


def render(chart: Path, values: dict[str, Any] | None = None) -> list[Doc]:
    """`helm template` of `chart` with `values` (as a values file): the rendered objects."""
    result = _template(chart, values or {})
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(chart: Path, values: dict[str, Any]) -> str:
    """The error of a render that must fail."""
    result = _template(chart, values)
    assert result.returncode != 0, f"rendered although it should not:\n{result.stdout}"
    return result.stderr


def build_example(into: Path) -> Path:
    """A copy of the example app chart whose dependency on this chart is built (charts/*.tgz)."""
    app = into / "app"
    app.mkdir()
    for file in EXAMPLE.rglob("*"):
        if file.is_file() and "charts" not in file.relative_to(EXAMPLE).parts:
            (app / file.relative_to(EXAMPLE)).parent.mkdir(parents=True, exist_ok=True)
            (app / file.relative_to(EXAMPLE)).write_text(file.read_text())
    chart_yaml = app / "Chart.yaml"
    chart_yaml.write_text(chart_yaml.read_text().replace("file://../..", f"file://{CHART}"))
    result = helm("dependency", "build", app)
    assert result.returncode == 0, result.stderr
    return app


def one(docs: list[Doc], kind: str) -> Doc:
    (doc,) = (d for d in docs if d["kind"] == kind)
    return doc


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar(docs: list[Doc]) -> Doc:
    spec = pod_spec(docs)
    container: Doc
    (container,) = (
        c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == "outrigger"
    )
    return container


def validate_builtin(docs: list[Doc], version: str) -> list[str]:
    """kubernetes-validate --strict on every object but the monitoring CRDs: their kinds, in order.
    A kind without a schema fails (SchemaNotFoundError) instead of passing unchecked."""
    kinds = []
    for doc in docs:
        if doc["kind"] not in MONITORING_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)
            kinds.append(doc["kind"])
    return kinds
