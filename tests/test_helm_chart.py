"""The Helm chart's sidecar forms: native by default, classic with a preStop sleep on request.

No `helm` binary is assumed on the test machine, so these read values.yaml and the sidecar
template's conditional blocks; `helm template` with both values is the end-to-end check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "outrigger"


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def _blocks(condition: str) -> list[str]:
    """The bodies of `{{- if CONDITION }} ... {{- end }}` in the sidecar template (not nested)."""
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    sidecar = text[text.index('define "outrigger.sidecarFor"') : text.index('define "outrigger.volumesFor"')]
    pattern = re.escape(f"{{{{- if {condition} }}}}") + r"(.*?)\{\{- end \}\}"
    return re.findall(pattern, sidecar, re.DOTALL)


def test_native_sidecar_is_the_default() -> None:
    assert _values()["nativeSidecar"] is True


def test_native_sidecar_has_restart_policy_always_and_a_startup_probe_on_readyz() -> None:
    native = "".join(_blocks("$v.nativeSidecar"))
    assert "restartPolicy: Always" in native
    assert "startupProbe:" in native
    assert '"path" "/readyz" "settings" $v.probes.startup' in native
    assert set(_values()["probes"]["startup"]) == {"periodSeconds", "timeoutSeconds", "failureThreshold"}


def test_classic_sidecar_sleeps_in_pre_stop_for_the_configured_time() -> None:
    (classic,) = _blocks("not $v.nativeSidecar")
    assert "preStop:" in classic
    assert "time.sleep(%v)" in classic
    assert "$v.classicSidecar" in classic
    assert _values()["classicSidecar"]["preStopSleepSeconds"] > 0


def test_the_native_form_has_no_pre_stop_hook() -> None:
    assert "preStop:" not in "".join(_blocks("$v.nativeSidecar"))
