"""The HTTP side: authentication, RBAC switches, routing of REST paths to storage, watch streaming."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from . import discovery, ephemeral, podsecurity
from . import exec as execmod
from .kubelet import Kubelet
from .patch import apply_patch
from .processes import ProcessTable
from .resources import BY_KIND, BY_PATH, Resource
from .selectors import field_selector, label_selector
from .settings import Settings
from .status import ApiError, bad_request, conflict, forbidden, invalid, no_such_path, rbac_forbidden, unauthorized
from .store import Store
from .tables import to_table, wants_table
from .watch import WatchSettings, serve_watch

Obj = dict[str, Any]
PODS = BY_KIND["Pod"]
NAMESPACES = BY_KIND["Namespace"]


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def respond(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=dumps(obj), status=status, content_type="application/json")


class ApiServer:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.kubelet = Kubelet(store, settings)
        self.processes = ProcessTable()
        self.watch_settings = WatchSettings()
        # Transports of the requests being handled (watches and exec streams are the long-lived ones): a restart
        # cuts them, since the server that held them is gone. Touched only on the server loop.
        self._in_flight: set[asyncio.Transport] = set()

    def make_app(self) -> web.Application:
        """A fresh application for each (re)start: an aiohttp app is frozen by the runner that served it."""
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    def drop_connections(self) -> None:
        """Cut every request in flight at the TCP level, without a TLS close_notify or a WebSocket close frame:
        what clients see when the API server process dies. Must run on the server loop."""
        for transport in list(self._in_flight):
            transport.abort()
        self._in_flight.clear()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.settings.record(request.method, request.path, request.path_qs)
        transport = request.transport
        if transport is not None:
            self._in_flight.add(transport)
        try:
            if request.headers.get("Authorization", "") != f"Bearer {self.settings.token}":
                raise unauthorized()
            as_user = request.headers.get("Impersonate-User")
            if as_user and not self.settings.allowed("impersonate", "users", ""):
                # Impersonation is authorized before the request itself, as the authenticated user, cluster-wide.
                raise rbac_forbidden(self.settings.user, "impersonate", "users", "", "", "", as_user)
            return await self.route(request)
        except ApiError as err:
            return respond(err.status(), err.code)
        finally:
            if transport is not None:
                self._in_flight.discard(transport)

    async def route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts == ["version"]:
            return respond(discovery.CLUSTER_VERSION)
        if parts == ["api"]:
            return respond(discovery.api_versions())
        if parts == ["apis"]:
            return respond(discovery.api_groups())
        if parts and parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts and parts[0] == "apis" and len(parts) == 2:
            found = discovery.api_group(parts[1])
            if found is None:
                raise no_such_path()
            return respond(found)
        elif parts and parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise no_such_path()
        if not rest:
            listing = discovery.resource_list(group, version)
            if listing is None:
                raise no_such_path()
            return respond(listing)
        return await self.resource(request, group, version, rest)

    async def resource(self, request: web.Request, group: str, version: str, rest: list[str]) -> web.StreamResponse:
        ns = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        res = BY_PATH.get((group, version, rest[0]))
        if res is None or len(rest) > 3 or (ns and not res.namespaced):
            raise no_such_path()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub not in res.subresources:
            raise no_such_path()
        if sub == "ephemeralcontainers" and self.settings.no_ephemeral_containers:
            raise no_such_path()
        verb = self.verb(request, name)
        if sub == "exec" and request.method == "GET":
            verb = self.settings.exec_upgrade_verb  # the WebSocket upgrade; a POST (SPDY) is "create" anyway
        if not self.settings.allowed(verb, res.name, sub):
            raise rbac_forbidden(self.settings.user, verb, res.name, sub, res.group, ns, name)
        if sub == "exec":
            pod = self.store.get(PODS, ns, name)
            netns = self.settings.netns.get((ns, name))
            return await execmod.handle(request, pod, netns, self.settings, self.processes)
        if sub == "ephemeralcontainers":
            return await self.ephemeral(request, ns, name)
        if sub == "status" and request.method == "GET":
            return respond(self.store.get(res, ns, name))
        if sub:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if verb == "get":
            obj = self.store.get(res, ns, name)
            if wants_table(request.headers.get("Accept", "")):
                return respond(to_table(res.kind, [obj], obj["metadata"]["resourceVersion"],
                                        request.query.get("includeObject", "")))
            return respond(obj)
        if verb == "list":
            return self.list(request, res, ns)
        if verb == "watch":
            return await self.watch(request, res, ns)
        if verb == "delete":
            deleted = self.store.delete(res, ns, name)
            if res is PODS:
                self.processes.kill_pod((ns, name))
            return respond(deleted)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    @staticmethod
    def verb(request: web.Request, name: str) -> str:
        method = request.method
        if method == "GET":
            if name:
                return "get"
            return "watch" if request.query.get("watch", "") in ("1", "true", "True") else "list"
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())

    def list(self, request: web.Request, res: Resource, ns: str) -> web.Response:
        items, rv = self.store.list(res, ns)
        match_l = label_selector(request.query.get("labelSelector"))
        match_f = field_selector(request.query.get("fieldSelector"), res.kind)
        items = [o for o in items if match_l(o) and match_f(o)]
        if wants_table(request.headers.get("Accept", "")):
            return respond(to_table(res.kind, items, rv, request.query.get("includeObject", "")))
        for obj in items:
            # Items of a list from a real server carry no kind/apiVersion of their own.
            obj.pop("kind", None)
            obj.pop("apiVersion", None)
        return respond({"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": {"resourceVersion": rv},
                        "items": items})

    async def watch(self, request: web.Request, res: Resource, ns: str) -> web.StreamResponse:
        return await serve_watch(request, self.store, self.watch_settings, res, ns)

    async def ephemeral(self, request: web.Request, ns: str, name: str) -> web.Response:
        old = self.store.get(PODS, ns, name)
        if request.method == "GET":
            return respond(old)
        if request.method not in ("PATCH", "PUT"):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise bad_request(f"error decoding request body: {exc}") from exc
        if request.method == "PATCH":
            requested = apply_patch(request.headers.get("Content-Type", ""), old, body)
            if not isinstance(requested, dict):
                raise bad_request("the patched object is not a Pod")
            rv = (requested.get("metadata") or {}).get("resourceVersion")
        else:
            if not isinstance(body, dict) or body.get("kind", "Pod") != "Pod":
                raise bad_request("the body of the request must be a Pod")
            requested = body
            rv = (body.get("metadata") or {}).get("resourceVersion")
            if not rv:
                raise invalid("Pod", name, [{"reason": "FieldValueInvalid", "field": "metadata.resourceVersion",
                                             "message": "Invalid value: 0x0: must be specified for an update"}])
        if rv and rv != old["metadata"]["resourceVersion"]:
            # The storage layer compares resourceVersions before validation or admission ever run.
            raise conflict("pods", name)
        new = ephemeral.merge_into(old, requested)
        ephemeral.apply_defaults(new)
        errs = ephemeral.validate_update(old, new)
        if errs:
            raise invalid("Pod", name, errs)
        ns_labels = self.namespace_labels(ns)
        reason = podsecurity.check(ns_labels, new)
        if reason:
            raise forbidden("pods", name, "", reason)
        stored = self.store.update(PODS, new, expect_rv=rv or old["metadata"]["resourceVersion"])
        old_names = {c["name"] for c in old["spec"].get("ephemeralContainers", [])}
        added = [c["name"] for c in stored["spec"].get("ephemeralContainers", []) if c["name"] not in old_names]
        if added:
            self.kubelet.started(ns, name, added)
        return respond(stored)

    def namespace_labels(self, ns: str) -> dict[str, str]:
        try:
            return dict(self.store.get(NAMESPACES, "", ns)["metadata"].get("labels") or {})
        except ApiError:
            return {}
