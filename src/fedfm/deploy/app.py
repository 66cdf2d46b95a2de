"""The coordinator's HTTP API (FastAPI), version 1, under ``/api/v1``; the OpenAPI spec is at
``/openapi.json`` and the live dashboard at ``/``.

Every ``/api/v1`` route but ``/health`` needs ``Authorization: Bearer <token>`` (a client or
viewer token from ``fedfm server add-client``); training routes need a client token, and a
client only ever sees and uploads for its own tasks. Uploads are streamed to disk with a size
limit and a SHA-256 check, then validated (``fedfm.deploy.wire``) before they are accepted; every
refusal is a 4xx whose ``detail`` names the problem.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

import fedfm
from fedfm.deploy.coordinator import Coordinator, DeployError
from fedfm.deploy.store import ClientRecord

API = "/api/v1"
MAX_WAIT_S = 120.0
_bearer = HTTPBearer(auto_error=False)


class RegisterRequest(BaseModel):
    agent_version: str | None = Field(default=None, max_length=64)
    info: dict[str, str] = Field(default_factory=dict, max_length=32)


class RegisterResponse(BaseModel):
    name: str
    client_id: int
    run_id: str
    config: dict[str, Any]
    heartbeat_s: float
    long_poll_s: float


class TaskOut(BaseModel):
    task_id: str
    round: int
    kind: str
    protocol: str  # plain: upload the update; secagg: the secure aggregation steps
    client_id: int
    deadline: float | None
    state_sha256: str
    state_bytes: int


class TaskResponse(BaseModel):
    task: TaskOut | None
    run_state: str


class Ack(BaseModel):
    ok: bool
    run_state: str


class UploadAck(BaseModel):
    accepted: bool
    task_id: str
    round: int


class UpdateFacts(BaseModel):
    num_examples: int = Field(gt=0, le=2**53)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=64)


class Advertise(BaseModel):
    c_pk: str = Field(max_length=64)
    s_pk: str = Field(max_length=64)
    facts: UpdateFacts


class Shares(BaseModel):
    shares: dict[str, str] = Field(max_length=4096)


class Unmask(BaseModel):
    shares: dict[str, list[str]] = Field(max_length=4096)


class Health(BaseModel):
    status: str
    fedfm_version: str
    api_version: str


def authenticated(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ClientRecord:
    """The registration behind the request's bearer token (401 if none or revoked)."""
    coordinator: Coordinator = request.app.state.coordinator
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise DeployError(401, "missing 'Authorization: Bearer <token>' header")
    record = coordinator.store.authenticate(credentials.credentials)
    if record is None:
        raise DeployError(401, "unknown or revoked token")
    coordinator.seen(record.name)
    return record


def training_client(record: Annotated[ClientRecord, Depends(authenticated)]) -> ClientRecord:
    if record.role != "client" or record.client_id is None:
        raise DeployError(403, f"{record.name!r} is a viewer; training needs a client token")
    return record


Client = Annotated[ClientRecord, Depends(training_client)]
Anyone = Annotated[ClientRecord, Depends(authenticated)]


def create_app(coordinator: Coordinator) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        # long polls park a worker thread each: room for hundreds of clients
        anyio.to_thread.current_default_thread_limiter().total_tokens = 512
        yield

    app = FastAPI(title="fedfm coordinator", version="1", lifespan=lifespan,
                  description="Federated fine-tuning coordinator: register, poll for a task, "
                              "download the global State, upload an update.")
    app.state.coordinator = coordinator

    @app.exception_handler(DeployError)
    async def _refused(request: Request, exc: DeployError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail})

    @app.get(f"{API}/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", fedfm_version=fedfm.__version__, api_version="v1")

    @app.post(f"{API}/register", response_model=RegisterResponse)
    def register(body: RegisterRequest, client: Client) -> RegisterResponse:
        coordinator.store.touch(client.name, {"agent_version": body.agent_version or "",
                                              **body.info})
        config = coordinator.config.model_dump(mode="json")
        for site_specific in ("path", "validation_path"):  # paths on the coordinator
            config["data"].pop(site_specific, None)
        assert client.client_id is not None
        return RegisterResponse(name=client.name, client_id=client.client_id,
                                run_id=coordinator.store.get_meta("config_hash") or "",
                                config=config, heartbeat_s=coordinator.config.deploy.heartbeat_s,
                                long_poll_s=coordinator.config.deploy.long_poll_s)

    @app.post(f"{API}/heartbeat", response_model=Ack)
    def heartbeat(client: Anyone) -> Ack:
        return Ack(ok=True, run_state=coordinator.run_state)

    @app.get(f"{API}/tasks/next", response_model=TaskResponse)
    def next_task(client: Client, wait: Annotated[float, Query(
            ge=0.0, le=MAX_WAIT_S, description="Seconds to wait for a task (long poll; "
                                               "capped at deploy.long_poll_s).")] = 0.0
                  ) -> TaskResponse:
        wait = min(wait, coordinator.config.deploy.long_poll_s)
        task = coordinator.next_task(client.client_id, wait)
        if task is None:
            return TaskResponse(task=None, run_state=coordinator.run_state)
        payload, digest = coordinator.broadcast_for(task)
        deadline = coordinator.view.deadline if coordinator.view.index == task.round else None
        return TaskResponse(task=TaskOut(
            task_id=task.task_id, round=task.round, kind=task.kind,
            protocol="secagg" if coordinator.secure is not None else "plain",
            client_id=task.client_id,
            deadline=deadline, state_sha256=digest, state_bytes=len(payload)),
            run_state=coordinator.run_state)

    def _own_task(client: ClientRecord, task_id: str) -> Any:
        task = coordinator.store.get_task(task_id)
        if task is None:
            raise DeployError(404, f"no task {task_id!r}")
        if task.client_id != client.client_id:
            raise DeployError(403, f"task {task_id} is not assigned to this client")
        return task

    @app.get(f"{API}/tasks/{{task_id}}/state", response_class=Response, responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "The broadcast (safetensors)."}})
    def download_state(task_id: str, client: Client) -> Response:
        task = _own_task(client, task_id)
        payload, digest = coordinator.broadcast_for(task)
        return Response(content=payload, media_type="application/octet-stream",
                        headers={"X-Content-SHA256": digest})

    @app.put(f"{API}/tasks/{{task_id}}/update", response_model=UploadAck, responses={
        400: {"description": "checksum mismatch"}, 403: {"description": "not your task"},
        404: {"description": "no such task"}, 409: {"description": "replayed or stale"},
        413: {"description": "too large"}, 422: {"description": "invalid update"}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_update(task_id: str, request: Request, client: Client,
                            x_content_sha256: Annotated[str, Header(
                                min_length=64, max_length=64, pattern="^[0-9a-fA-F]{64}$")]
                            ) -> UploadAck:
        task = await run_in_threadpool(coordinator.task_for_upload, client.client_id, task_id)
        limit = coordinator.update_limit()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise DeployError(413, f"update of {declared} bytes exceeds the {limit}-byte limit")
        incoming = coordinator.incoming_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with open(incoming, "wb") as handle:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise DeployError(413, f"update exceeds the {limit}-byte limit")
                    digest.update(chunk)
                    handle.write(chunk)
        except BaseException:
            incoming.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != x_content_sha256.lower():
            incoming.unlink(missing_ok=True)
            raise DeployError(400, "X-Content-SHA256 does not match the body (corrupted or "
                                   "truncated upload); send it again")
        result = await run_in_threadpool(coordinator.receive_update, task, incoming,
                                         digest.hexdigest())
        return UploadAck(**result)

    _secure_routes(app, coordinator)

    @app.get(f"{API}/status")
    def status(viewer: Anyone) -> dict[str, Any]:
        return coordinator.status()

    @app.get(f"{API}/metrics")
    def metrics(viewer: Anyone, since: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        rounds = [r for r in coordinator.run_dir.read_metrics() if int(r.get("round", 0)) > since]
        return {"rounds": json.loads(json.dumps(rounds, default=str))}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        page = resources.files("fedfm.deploy").joinpath("dashboard.html").read_text("utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return app


Wait = Annotated[float, Query(ge=0.0, le=MAX_WAIT_S, description="Seconds to wait (long poll).")]


def _client_ids(raw: dict[str, Any], what: str) -> dict[int, Any]:
    try:
        return {int(k): v for k, v in raw.items()}
    except ValueError:
        raise DeployError(422, f"{what}: keys must be client ids (integers)") from None


def _secure_routes(app: FastAPI, coordinator: Coordinator) -> None:
    """The four SecAgg+ steps (``fedfm.deploy.secure``) for the clients of a secure round."""
    from fedfm.deploy.secure import KEY_BYTES, b64, unb64

    def finite(facts: UpdateFacts) -> dict[str, Any]:
        from fedfm.deploy.wire import WireError, check_metadata, check_scalars

        found = facts.model_dump()
        try:
            check_scalars(found["metrics"], "facts.metrics")
            check_metadata(found["metadata"])
        except WireError as exc:
            raise DeployError(422, str(exc)) from None
        return found

    def waited(client: ClientRecord, round_index: int, phase: str, wait: float,
               action: Any) -> dict[str, Any]:
        found = coordinator.secure_wait(client.client_id, round_index, phase,
                                        min(wait, coordinator.config.deploy.long_poll_s), action)
        return {"ready": False} if found is None else {"ready": True, **found}

    @app.post(f"{API}/secagg/{{round_index}}/advertise", response_model=Ack)
    def advertise(round_index: int, body: Advertise, client: Client) -> Ack:
        c_pk = _decoded(unb64, body.c_pk, "c_pk", KEY_BYTES)
        s_pk = _decoded(unb64, body.s_pk, "s_pk", KEY_BYTES)
        facts = finite(body.facts)
        coordinator.secure_act(client.client_id, round_index, lambda r: r.advertise(
            client.client_id, c_pk, s_pk, facts))
        return Ack(ok=True, run_state=coordinator.run_state)

    @app.get(f"{API}/secagg/{{round_index}}/neighbours")
    def neighbours(round_index: int, client: Client, wait: Wait = 0.0) -> dict[str, Any]:
        def keys(r: Any) -> dict[str, Any]:
            found = r.neighbour_keys(client.client_id)
            return {"threshold": r.threshold, "keys": {
                str(v): {"c_pk": b64(k["c_pk"]), "s_pk": b64(k["s_pk"])}
                for v, k in found.items()}}
        return waited(client, round_index, "share", wait, keys)

    @app.post(f"{API}/secagg/{{round_index}}/shares", response_model=Ack)
    def shares(round_index: int, body: Shares, client: Client) -> Ack:
        decoded = {v: _decoded(unb64, ct, f"shares[{v}]") for v, ct in
                   _client_ids(body.shares, "shares").items()}
        coordinator.secure_act(client.client_id, round_index,
                               lambda r: r.share(client.client_id, decoded))
        return Ack(ok=True, run_state=coordinator.run_state)

    @app.get(f"{API}/secagg/{{round_index}}/inbox")
    def inbox(round_index: int, client: Client, wait: Wait = 0.0) -> dict[str, Any]:
        return waited(client, round_index, "mask", wait, lambda r: {"shares": {
            str(u): b64(ct) for u, ct in r.shares_for(client.client_id).items()}})

    @app.put(f"{API}/secagg/{{round_index}}/masked", response_model=Ack,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
    async def masked(round_index: int, request: Request, client: Client) -> Ack:
        limit = 8 * (coordinator.secure_round.length if coordinator.secure_round else 0)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise DeployError(413, f"masked input exceeds {limit} bytes")
        if len(body) % 8:
            raise DeployError(422, "masked input: length is not a multiple of 8 bytes")
        vector = np.frombuffer(bytes(body), dtype="<u8").astype(np.uint64)
        await run_in_threadpool(coordinator.secure_act, client.client_id, round_index,
                                lambda r: r.mask(client.client_id, vector))
        return Ack(ok=True, run_state=coordinator.run_state)

    @app.get(f"{API}/secagg/{{round_index}}/unmask")
    def unmask_request(round_index: int, client: Client, wait: Wait = 0.0) -> dict[str, Any]:
        def request(r: Any) -> dict[str, Any]:
            survived, dropped = r.unmask_request(client.client_id)
            return {"survived": survived, "dropped": dropped}
        return waited(client, round_index, "unmask", wait, request)

    @app.post(f"{API}/secagg/{{round_index}}/unmask", response_model=Ack)
    def unmask(round_index: int, body: Unmask, client: Client) -> Ack:
        answer: dict[int, tuple[str, bytes]] = {}
        for u, pair in _client_ids(body.shares, "shares").items():
            if len(pair) != 2 or pair[0] not in ("b", "s"):
                raise DeployError(422, f"shares[{u}]: expected ['b' or 's', base64 share]")
            answer[u] = (pair[0], _decoded(unb64, pair[1], f"shares[{u}]"))
        coordinator.secure_act(client.client_id, round_index,
                               lambda r: r.unmask(client.client_id, answer))
        return Ack(ok=True, run_state=coordinator.run_state)


def _decoded(unb64: Any, text: str, what: str, size: int | None = None) -> bytes:
    try:
        return unb64(text, what, size)
    except ValueError as exc:
        raise DeployError(422, str(exc)) from None
