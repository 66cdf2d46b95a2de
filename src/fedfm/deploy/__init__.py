"""Real deployment: an HTTPS coordinator (``fedfm server``) and client agents (``fedfm client``).

* :mod:`fedfm.deploy.coordinator` -- the round loop with the ``remote`` runtime, crash-safe.
* :mod:`fedfm.deploy.app` -- the versioned REST API (FastAPI) and the dashboard page.
* :mod:`fedfm.deploy.store` -- SQLite (WAL) state: run, client registry, rounds, tasks, updates.
* :mod:`fedfm.deploy.wire` -- broadcasts and updates as safetensors, validated on arrival.
* :mod:`fedfm.deploy.agent` -- the client agent next to an organisation's data.
* :mod:`fedfm.deploy.certs` -- a self-signed CA and certificates for trying TLS out.
"""
