"""Legacy (non-aggregated) discovery documents; kubectl falls back to them when the server ignores the
aggregated-discovery Accept types, so answering plain application/json is enough and honest."""

from __future__ import annotations

from typing import Any

from .resources import GROUP_VERSIONS, RESOURCES

Obj = dict[str, Any]

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
CLUSTER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.4",
    "gitCommit": "59526cd4867447956156ae3a602fcbac10a2c335",
    "gitTreeState": "clean",
    "buildDate": "2025-04-22T16:00:00Z",
    "goVersion": "go1.23.6",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def api_versions() -> Obj:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}


def api_groups() -> Obj:
    groups = []
    for group, version in GROUP_VERSIONS:
        gv = {"groupVersion": f"{group}/{version}", "version": version}
        groups.append({"name": group, "versions": [gv], "preferredVersion": gv})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(group: str) -> Obj | None:
    for g in api_groups()["groups"]:
        if g["name"] == group:
            return {"kind": "APIGroup", "apiVersion": "v1", **g}
    return None


def resource_list(group: str, version: str) -> Obj | None:
    entries: list[Obj] = []
    for r in RESOURCES:
        if (r.group, r.version) != (group, version):
            continue
        entry: Obj = {"name": r.name, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
                      "verbs": VERBS}
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        entries.append(entry)
        for sub in r.subresources:
            verbs = {"ephemeralcontainers": ["get", "patch", "update"], "exec": ["create", "get"],
                     "status": ["get", "patch", "update"], "log": ["get"]}[sub]
            entries.append({"name": f"{r.name}/{sub}", "singularName": "", "namespaced": True,
                            "kind": "PodExecOptions" if sub == "exec" else r.kind, "verbs": verbs})
    if not entries:
        return None
    gv = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}
