"""Kubernetes `Status` error objects, raised as exceptions by handlers and rendered as JSON."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


class ApiError(Exception):
    """An API failure carrying the exact Status body a real API server would send."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def qualified(resource: str, group: str) -> str:
    # The API server names resources of non-core groups "deployments.apps" in messages.
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    details: Obj = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return ApiError(404, "NotFound", f'{qualified(resource, group)} "{name}" not found', details)


def no_such_path() -> ApiError:
    # What an API server answers for a path it does not serve (e.g. a subresource behind a disabled feature).
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def forbidden(resource: str, name: str, group: str, reason_text: str) -> ApiError:
    prefix = f'{qualified(resource, group)} "{name}"' if name else qualified(resource, group)
    details: Obj = {"kind": resource}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    return ApiError(403, "Forbidden", f"{prefix} is forbidden: {reason_text}", details)


def rbac_forbidden(
    user: str, verb: str, resource: str, subresource: str, group: str, namespace: str, name: str
) -> ApiError:
    full = f"{resource}/{subresource}" if subresource else resource
    text = f'User "{user}" cannot {verb} resource "{full}" in API group "{group}"'
    # The API server's authorizer message (k8s.io/apiserver responsewriters.forbiddenMessage) names the scope.
    text += f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    return forbidden(resource, name, group, text)


def invalid(kind: str, name: str, causes: list[Obj], group: str = "") -> ApiError:
    """422 Invalid; each cause is {"reason": "FieldValue...", "message": "Forbidden: ...", "field": "..."}."""
    parts = [f"{c['field']}: {c['message']}" for c in causes]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    details: Obj = {"name": name, "kind": kind, "causes": causes}
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {joined}', details)


def conflict(resource: str, name: str, group: str = "") -> ApiError:
    details: Obj = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    msg = (
        f'Operation cannot be fulfilled on {qualified(resource, group)} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    return ApiError(409, "Conflict", msg, details)


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def internal(message: str) -> ApiError:
    return ApiError(500, "InternalError", f"Internal error occurred: {message}", {"causes": [{"message": message}]})
