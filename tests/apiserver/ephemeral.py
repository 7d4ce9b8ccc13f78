"""Validation of an update through pods/ephemeralcontainers, mirroring ValidatePodEphemeralContainersUpdate."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

Obj = dict[str, Any]

# EphemeralContainerCommon fields an ephemeral container may set; everything else in Container is forbidden.
# Ordered like the Go struct so errors come out in the same order.
_FORBIDDEN_FIELDS = (
    "ports", "resources", "resizePolicy", "restartPolicy", "livenessProbe", "readinessProbe", "startupProbe",
    "lifecycle",
)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end "
    "with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


_WORDS = {
    "FieldValueForbidden": "Forbidden",
    "FieldValueDuplicate": "Duplicate value",
    "FieldValueNotFound": "Not found",
    "FieldValueRequired": "Required value",
    "FieldValueInvalid": "Invalid value",
}


def cause(reason: str, field: str, detail: str) -> Obj:
    # The cause message is field.Error.ErrorBody(): the type's words, then the detail.
    message = _WORDS[reason] + (f": {detail}" if detail else "")
    return {"reason": reason, "message": message, "field": field}


def merge_into(old_pod: Obj, requested: Obj) -> Obj:
    """What the subresource's strategy keeps: the stored pod with only spec.ephemeralContainers taken over."""
    new = copy.deepcopy(old_pod)
    ecs = (requested.get("spec") or {}).get("ephemeralContainers") or []
    new["spec"]["ephemeralContainers"] = copy.deepcopy(ecs)
    if not ecs:
        del new["spec"]["ephemeralContainers"]
    return new


def _defaulted(ec: Obj) -> Obj:
    # The API server fills these in before validating and storing; compare existing containers with them applied.
    out = dict(ec)
    out.setdefault("imagePullPolicy", "Always" if str(ec.get("image", "")).endswith(":latest")
                   or ":" not in str(ec.get("image", "")).rsplit("/", 1)[-1] else "IfNotPresent")
    out.setdefault("terminationMessagePath", "/dev/termination-log")
    out.setdefault("terminationMessagePolicy", "File")
    return out


def apply_defaults(pod: Obj) -> None:
    ecs = pod["spec"].get("ephemeralContainers")
    if ecs:
        pod["spec"]["ephemeralContainers"] = [_defaulted(ec) if isinstance(ec, dict) else ec for ec in ecs]


def validate_update(old_pod: Obj, new_pod: Obj) -> list[Obj]:
    errs: list[Obj] = []
    spec = new_pod["spec"]
    others = [c.get("name") for c in spec.get("containers", []) + spec.get("initContainers", [])]
    all_names = set(others)
    base = "spec.ephemeralContainers"
    for i, ec in enumerate(spec.get("ephemeralContainers", [])):
        path = f"{base}[{i}]"
        if not isinstance(ec, dict):
            errs.append(cause("FieldValueInvalid", path, "must be an object"))
            continue
        name = ec.get("name", "")
        if not name:
            errs.append(cause("FieldValueRequired", f"{path}.name", ""))
        elif not _DNS_LABEL.fullmatch(name) or len(name) > 63:
            errs.append(cause("FieldValueInvalid", f"{path}.name", f'"{name}": {_DNS_LABEL_MSG}'))
        if not ec.get("image"):
            errs.append(cause("FieldValueRequired", f"{path}.image", ""))
        if name in all_names:
            errs.append(cause("FieldValueDuplicate", f"{path}.name", f'"{name}"'))
        elif name:
            all_names.add(name)
        target = ec.get("targetContainerName")
        if target and target not in others:
            errs.append(cause("FieldValueNotFound", f"{path}.targetContainerName", f'"{target}"'))
        for fld in _FORBIDDEN_FIELDS:
            if ec.get(fld):
                errs.append(cause("FieldValueForbidden", f"{path}.{fld}", "cannot be set for an Ephemeral Container"))
        for j, vm in enumerate(ec.get("volumeMounts") or []):
            for sub in ("subPath", "subPathExpr"):
                if vm.get(sub):
                    errs.append(cause("FieldValueForbidden", f"{path}.volumeMounts[{j}].{sub}",
                                      "cannot be set for an Ephemeral Container"))
    new_by_name = {ec.get("name"): ec for ec in spec.get("ephemeralContainers", []) if isinstance(ec, dict)}
    for old in old_pod["spec"].get("ephemeralContainers", []):
        new = new_by_name.get(old["name"])
        if new is None:
            errs.append(cause("FieldValueForbidden", base, f'existing ephemeral containers "{old["name"]}" may not be '
                              "removed\n"))
        elif new != old:
            diff = json.dumps({"old": old, "new": new}, sort_keys=True)
            errs.append(cause("FieldValueForbidden", base, f'existing ephemeral containers "{old["name"]}" may not be '
                              f"changed\n{diff}"))
    return errs
