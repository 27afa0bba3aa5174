"""TLS client contexts from a policy's `tls` section: runtime work, so it lives outside proxy/config/.

The loader calls `client_context` once per section to reject unloadable files at load (with
file, line and key path); the transport calls it to build the context its pool keys on.
"""

from __future__ import annotations

import ssl

from proxy.config.model import TlsSettings


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """Verification on unless turned off; optional CA file and client certificate (mTLS)."""
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        key = str(tls.client_key) if tls.client_key else None
        context.load_cert_chain(str(tls.client_cert), key)
    return context
