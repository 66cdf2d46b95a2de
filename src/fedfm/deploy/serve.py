"""Run the coordinator: the round loop thread plus uvicorn serving the API over HTTP(S).

With ``tls_cert``/``tls_key`` the API is HTTPS; with ``tls_client_ca`` too, clients must present
a certificate signed by that CA (mutual TLS) on top of their bearer token. Once bound, the
address is written to ``STATE_DIR/endpoint.json`` (useful with ``--port 0``). After the last
round the server keeps answering for ``linger`` seconds, so agents learn that the run finished,
then exits.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fedfm.deploy.app import create_app
from fedfm.deploy.coordinator import Coordinator
from fedfm.deploy.store import atomic_write_bytes


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS
    linger: float = 10.0
    log_level: str = "warning"


def serve(coordinator: Coordinator, options: ServeOptions) -> int:
    """Serve until the run ends (plus ``linger``) or a signal; the exit code."""
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if options.tls_client_ca is not None and options.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", options.tls_cert), ("--tls-key", options.tls_key),
                       ("--tls-client-ca", options.tls_client_ca)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: {path} does not exist")
    coordinator.start()
    config = uvicorn.Config(
        create_app(coordinator), host=options.host, port=options.port,
        log_level=options.log_level, access_log=False,
        ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
        ssl_keyfile=str(options.tls_key) if options.tls_key else None,
        ssl_ca_certs=str(options.tls_client_ca) if options.tls_client_ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if options.tls_client_ca else ssl.CERT_NONE,
        timeout_keep_alive=75)
    server = uvicorn.Server(config)
    scheme = "https" if options.tls_cert else "http"
    threading.Thread(target=_announce, args=(server, coordinator, scheme), daemon=True).start()
    threading.Thread(target=_stop_when_done, args=(server, coordinator, options.linger),
                     daemon=True).start()
    server.run()
    return 0 if coordinator.run_state == "finished" else 1


def _announce(server: uvicorn.Server, coordinator: Coordinator, scheme: str) -> None:
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    endpoint = {"url": f"{scheme}://{shown}:{port}", "host": host, "port": port}
    atomic_write_bytes(coordinator.state_dir / "endpoint.json", json.dumps(endpoint).encode())
    print(f"fedfm coordinator listening on {endpoint['url']} (dashboard: {endpoint['url']}/)",
          flush=True)


def _stop_when_done(server: uvicorn.Server, coordinator: Coordinator, linger: float) -> None:
    coordinator.finished.wait()
    time.sleep(linger)
    server.should_exit = True
