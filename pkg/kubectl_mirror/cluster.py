"""The one Kubernetes boundary: REST calls and watches, and every way they fail, as errors.py's typed errors.

The Kubernetes client's ApiException and urllib3's transport errors are read here and nowhere else (kr8s keeps its
client the same way). Each failure becomes a ClusterError subclass carrying what the API server said as fields:
the Status code and reason, the call's verb and resource, the causes of a 422, what RBAC denied, the Pod Security
level that refused a pod, whether the path is served at all. Callers (tap, target, watchloop, ...) catch those
types and decide on the fields, never on message text; each error already holds the one-line, kubectl-style
message that says what to do, which a caller replaces only where it knows better (the tap's own cases).

Reading the server's words happens here too, once, where no field carries them: the verb and resource RBAC
denied ("User "u" cannot patch resource "pods/ephemeralcontainers" ...") and the Pod Security level
("violates PodSecurity "baseline:latest": ..."). Both formats are fixed by the API server's source.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from .errors import ApiError, Cause, ClusterError, Conflict, Forbidden, Invalid, NotFound, Timeout, Unreachable
from .kubeconfig import Connection
from .kubeconfig_files import first_line

# RBAC's denial, as the API server's authorizer words it (k8s.io/apiserver, responsewriters.forbiddenMessage).
_RBAC = re.compile(r'cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)" in API group "(?P<group>[^"]*)"'
                   r'(?P<cluster> at the cluster scope)?')
# Pod Security admission's refusal (k8s.io/pod-security-admission): `violates PodSecurity "LEVEL:VERSION": ...`.
_PSA = re.compile(r'violates PodSecurity "(?P<level>[a-z]+):(?P<version>[^"]*)"')
_VERBS = {"PATCH": "patch", "POST": "create", "PUT": "update", "DELETE": "delete"}


@dataclass(frozen=True, slots=True)
class Call:
    """A call as RBAC names it: verb, resource (pods, deployments.apps, pods/ephemeralcontainers), where."""

    verb: str
    resource: str
    namespace: str = ""
    name: str = ""

    @classmethod
    def of(cls, method: str, path: str, params: Mapping[str, str], query: Sequence[tuple[str, str]] = ()) -> Call:
        """The call a REST path template stands for: /apis/apps/v1/namespaces/{namespace}/deployments/{name}..."""
        parts = [p.format(**params) if "{" in p else p for p in path.strip("/").split("/")]
        group, rest = ("", parts[2:]) if parts[:1] == ["api"] else (parts[1] if len(parts) > 1 else "", parts[3:])
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        plural = (rest[0] if rest else "") + (f".{group}" if group else "")
        name = rest[1] if len(rest) > 1 else ""
        resource = plural + (f"/{rest[2]}" if len(rest) > 2 else "")
        if method == "GET":
            verb = "get" if name else ("watch" if ("watch", "true") in query else "list")
        else:
            verb = _VERBS.get(method, method.lower())
        return cls(verb, resource, namespace, name)


# ---- calls ------------------------------------------------------------------------------------------------


def call(conn: Connection, method: str, path: str, params: Mapping[str, str] | None = None, *,
         query: Sequence[tuple[str, str]] = (), body: Any = None, content_type: str | None = None,
         timeout: Any = None) -> dict[str, Any]:
    """One REST call, its JSON answer read and parsed; every failure raised as a typed ClusterError.

    `path` is a template such as /api/v1/namespaces/{namespace}/pods/{name}, filled from `params` (escaped by the
    client). Goes through the client's auth, TLS and our impersonation headers. The generated API classes are not
    used: importing CoreV1Api builds ~300 pydantic models, ~0.4 s of every live start, for answers read as JSON.
    """
    what = Call.of(method, path, params or {}, query)
    resp = _send(conn, what, method, path, params, query, body, content_type, timeout)
    with transport_errors(conn):
        data = json.loads(resp.data)
    if not isinstance(data, dict):
        raise ClusterError("the API server sent something that is not a JSON object")
    return data


class Watch:
    """A watch response: its events' JSON lines, shutdown (wakes a blocked read from another thread), close."""

    def __init__(self, conn: Connection, resp: Any) -> None:
        self._conn, self._resp = conn, resp

    def lines(self) -> Iterator[bytes]:
        """One JSON line per event (chunks may split or join them); a cut stream raises Unreachable or Timeout."""
        with transport_errors(self._conn):
            yield from watch_lines(self._resp)

    def shutdown(self) -> None:
        self._resp.shutdown()

    def close(self) -> None:
        self._resp.release_conn()


def watch(conn: Connection, path: str, params: Mapping[str, str], query: Sequence[tuple[str, str]], *,
          timeout: Any = None) -> Watch:
    """Open a watch (`query` holds watch=true, resourceVersion, ...); failures to open it raised typed."""
    what = Call.of("GET", path, params, query)
    return Watch(conn, _send(conn, what, "GET", path, params, query, None, None, timeout))


def watch_lines(resp: Any) -> Iterator[bytes]:
    """The events of a watch response, one JSON line each; chunks may split or join them."""
    pending = b""
    for chunk in resp.stream(65536, decode_content=False):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()  # the part after the last newline: the start of a line still coming
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def _send(conn: Connection, what: Call, method: str, path: str, params: Mapping[str, str] | None,
          query: Sequence[tuple[str, str]], body: Any, content_type: str | None, timeout: Any) -> Any:
    client = conn.api_client
    headers = {"Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = client.param_serialize(method=method, resource_path=path, path_params=dict(params or {}),
                                     query_params=list(query), header_params=headers, body=body,
                                     auth_settings=["BearerToken"])
    try:
        with transport_errors(conn):
            resp: Any = client.call_api(*request, _request_timeout=timeout)
            if not 200 <= resp.status <= 299:
                resp.read()
                raise ApiException.from_response(http_resp=resp, body=None, data=None)
    except ApiException as exc:
        raise api_error(exc, what, context=conn.context, as_user=_as_user(conn),
                        server=conn.api_client.configuration.host) from None
    return resp.response


def _as_user(conn: Connection) -> str | None:
    return dict(conn.impersonation).get("Impersonate-User")


# ---- the API server's answers ------------------------------------------------------------------------------


def _status(body: str | bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(body or "")
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("kind") == "Status" else {}


def _causes(details: Mapping[str, Any]) -> tuple[Cause, ...]:
    return tuple(Cause(str(c.get("reason") or ""), str(c.get("field") or ""), str(c.get("message") or ""))
                 for c in details.get("causes") or [] if isinstance(c, dict))


def api_error(exc: ApiException, what: Call, *, context: str, as_user: str | None = None,
              server: str = "") -> ClusterError:
    """The typed error for the client's ApiException on `what`: fields from the Status body, one-line message."""
    code = int(exc.status or 0)
    if code == 0:  # the client's own wrapping of a transport failure (SSLError), not an answer from the server
        found = transport_error(exc.__cause__ or exc.__context__ or exc, server)
        said = " ".join(str(exc.reason or "").split()) or type(exc).__name__
        return found or Unreachable(f"cannot talk to the Kubernetes API server at {server} ({said}); check the "
                                    "server address and certificates in your kubeconfig", server=server)
    return status_error(code, exc.body, what, context=context, as_user=as_user, http_reason=str(exc.reason or ""))


def status_error(code: int, body: str | bytes | None, what: Call, *, context: str, as_user: str | None = None,
                 http_reason: str = "") -> ApiError:
    """The typed error for an HTTP `code` and its Status `body` (REST calls, and the exec WebSocket's handshake)."""
    status = _status(body)
    details = status.get("details") if isinstance(status.get("details"), dict) else {}
    said = str(status.get("message") or "").split("\n", 1)[0] or f"{code} {http_reason}".strip()
    fields: dict[str, Any] = {
        "status": code, "reason": str(status.get("reason") or http_reason), "verb": what.verb,
        "resource": what.resource, "namespace": what.namespace, "name": what.name, "server_message": said,
        "causes": _causes(details or {}),
    }
    where = f'in namespace "{what.namespace}"' if what.namespace else "at the cluster scope"
    if code == 401:
        return ApiError(f"the API server rejected your credentials (context {context}); "
                        "log in again or check the user in your kubeconfig", **fields)
    if code == 403:
        return _forbidden(said, what, where, as_user, fields)
    if code == 404:
        served = bool(details and (details.get("name") or details.get("kind")))
        if what.name:  # also when the path is not served (e.g. a namespace with a "/" in it): as the user sees it
            message = f'{what.resource.split("/")[0]} "{what.name}" not found {where}'
        else:
            message = f"cannot {what.verb} {what.resource}{' ' + what.name if what.name else ''} {where}: {said}"
        err = NotFound(message, **fields)
        err.served = served
        return err
    generic = f"cannot {what.verb} {what.resource}{' ' + what.name if what.name else ''} {where}: {said}"
    if code == 409:
        return Conflict(generic, **fields)
    if code == 422:
        return Invalid(generic, **fields)
    return ApiError(generic, **fields)


def _forbidden(said: str, what: Call, where: str, as_user: str | None, fields: dict[str, Any]) -> Forbidden:
    psa = _PSA.search(said)
    rbac = _RBAC.search(said) if psa is None else None
    verb, resource = what.verb, what.resource
    if rbac is not None:
        group = rbac.group("group")
        base, slash, sub = rbac.group("resource").partition("/")
        verb, resource = rbac.group("verb"), base + (f".{group}" if group else "") + slash + sub
    if psa is not None:
        message = (f'Pod Security "{psa.group("level")}:{psa.group("version")}" refused to {what.verb} '
                   f"{what.resource} {what.name} {where}; ask an admin of the namespace to allow it ({said})")
    elif verb == "impersonate":
        # The server refused the impersonation itself: what is missing is your own user's right to impersonate.
        target = f' "{as_user}"' if as_user and resource == "users" else ""
        message = (f"forbidden: your user cannot impersonate {resource}{target} (--as); ask your cluster admin "
                   f'for RBAC "impersonate" on "{resource}" ({said})')
    else:
        if rbac is not None and rbac.group("cluster"):
            where = "at the cluster scope"
        as_note = f" (as {as_user})" if as_user else ""
        message = (f"forbidden{as_note}: cannot {verb} {resource} {where}; ask your cluster admin for RBAC "
                   f'"{verb}" on "{resource}" ({said})')
    err = Forbidden(message, **fields)
    err.denied_verb, err.denied_resource = (verb, resource) if psa is None else ("", "")
    if psa is not None:
        err.pod_security, err.pod_security_version = psa.group("level"), psa.group("version")
    return err


# ---- transport --------------------------------------------------------------------------------------------


def transport_error(exc: BaseException, server: str) -> Unreachable | None:
    """The typed error for a transport failure (unreachable, TLS, timeout, cut), or None when `exc` is not one."""
    cause: BaseException | None = exc
    for _ in range(8):  # urllib3 wraps the socket error a few levels deep
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return Unreachable(f"TLS failure talking to {server}: {cause.verify_message}; check the cluster's "
                               "certificate-authority (or --tls-server-name) in your kubeconfig", server=server)
        if isinstance(cause, ssl.SSLError):
            return Unreachable(f"TLS failure talking to {server}: {first_line(cause)}; "
                               "check the server address and certificates in your kubeconfig", server=server)
        if isinstance(cause, (TimeoutError, socket.timeout)):
            return Timeout(_unreachable(server, cause), server=server)
        if isinstance(cause, (ConnectionRefusedError, socket.gaierror)):
            return Unreachable(_unreachable(server, cause), server=server)
        if isinstance(cause, urllib3.exceptions.MaxRetryError) and cause.reason is not None:
            cause = cause.reason
            continue
        if isinstance(cause, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
                              urllib3.exceptions.ReadTimeoutError)):
            nxt = cause.__cause__ or cause.__context__
            if nxt is None:
                # NewConnectionError is a ConnectTimeoutError too, for urllib3's backward compatibility.
                timed_out = not isinstance(cause, urllib3.exceptions.NewConnectionError)
                return (Timeout if timed_out else Unreachable)(_unreachable(server, cause), server=server)
            cause = nxt
            continue
        if isinstance(cause, (urllib3.exceptions.ProtocolError, ConnectionError, OSError)):
            return Unreachable(f"lost the connection to the Kubernetes API server at {server}: {first_line(cause)}",
                               server=server)
        cause = cause.__cause__ or cause.__context__
    return None


def _unreachable(server: str, cause: BaseException) -> str:
    return (f"cannot reach the Kubernetes API server at {server} ({first_line(cause)}); "
            "check --server/--context and that the cluster is up")


@contextmanager
def transport_errors(conn: Connection) -> Iterator[None]:
    """Inside the block, transport failures (urllib3, sockets, TLS) are raised as Unreachable or Timeout."""
    try:
        yield
    except (ClusterError, ApiException):
        raise
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        err = transport_error(exc, str(conn.api_client.configuration.host))
        if err is None:
            raise
        raise err from None
