"""Builders for API objects shaped like what a real cluster returns (defaults filled in by the server)."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from .store import now_rfc3339

Obj = dict[str, Any]

_ip_counter = itertools.count(10)


def node_name_for(node_os: str) -> str:
    return f"node-{node_os}-1"


def namespace(name: str, labels: dict[str, str] | None) -> Obj:
    merged = {"kubernetes.io/metadata.name": name, **(labels or {})}
    return {
        "metadata": {"name": name, "labels": merged},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def node(node_os: str) -> Obj:
    name = node_name_for(node_os)
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/os": node_os, "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name},
        },
        "spec": {},
        "status": {
            "nodeInfo": {"operatingSystem": node_os, "architecture": "amd64", "kubeletVersion": "v1.32.4",
                         "containerRuntimeVersion": "containerd://1.7.24"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }


def _container(spec: Obj) -> Obj:
    c = dict(spec)
    c.setdefault("imagePullPolicy", "IfNotPresent")
    c.setdefault("resources", {})
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    for port in c.get("ports", []):
        port.setdefault("protocol", "TCP")
    return c


def _container_id(pod: str, name: str) -> str:
    return "containerd://" + hashlib.sha256(f"{pod}/{name}".encode()).hexdigest()


def container_status(pod_name: str, spec: Obj, phase: str, ready: bool, started_at: str) -> Obj:
    status: Obj = {
        "name": spec["name"],
        "image": spec.get("image", ""),
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "started": phase == "Running",
    }
    if phase == "Running":
        status["state"] = {"running": {"startedAt": started_at}}
        status["containerID"] = _container_id(pod_name, spec["name"])
        status["imageID"] = spec.get("image", "") + "@sha256:" + "0" * 64
    elif phase in ("Succeeded", "Failed"):
        code = 0 if phase == "Succeeded" else 1
        status["state"] = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                          "startedAt": started_at, "finishedAt": started_at}}
        status["containerID"] = _container_id(pod_name, spec["name"])
    else:
        status["state"] = {"waiting": {"reason": "ContainerCreating"}}
    return status


def pod(
    ns: str,
    name: str,
    labels: dict[str, str] | None,
    containers: list[Obj],
    phase: str,
    ready: bool,
    node_os: str,
    pod_ip: str | None,
) -> Obj:
    ts = now_rfc3339()
    running = phase == "Running"
    if pod_ip is None and running:
        pod_ip = f"10.244.0.{next(_ip_counter) % 250 + 2}"
    ready_str = "True" if ready and running else "False"
    conditions = [
        {"type": "PodReadyToStartContainers", "status": "True" if running else "False", "lastTransitionTime": ts},
        {"type": "Initialized", "status": "True", "lastTransitionTime": ts},
        {"type": "Ready", "status": ready_str, "lastTransitionTime": ts},
        {"type": "ContainersReady", "status": ready_str, "lastTransitionTime": ts},
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": ts},
    ]
    if ready_str == "False":
        for cond in conditions[2:4]:
            cond["reason"] = "ContainersNotReady"
    status: Obj = {
        "phase": phase,
        "conditions": conditions,
        "hostIP": "172.18.0.2",
        "hostIPs": [{"ip": "172.18.0.2"}],
        "startTime": ts,
        "containerStatuses": [container_status(name, c, phase, ready and running, ts) for c in containers],
        "qosClass": "BestEffort",
    }
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return {
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {})},
        "spec": {
            "containers": [_container(c) for c in containers],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "nodeName": node_name_for(node_os),
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
            ],
        },
        "status": status,
    }


def template_hash(ns: str, name: str) -> str:
    # Real hashes are 8-10 chars of a safe alphabet; what matters is that it is stable per deployment.
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    digest = int(hashlib.sha256(f"{ns}/{name}".encode()).hexdigest(), 16)
    return "".join(alphabet[(digest >> (5 * i)) % len(alphabet)] for i in range(10))


def owner_ref(owner: Obj) -> Obj:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def workload(kind: str, ns: str, name: str, match_labels: dict[str, str], replicas: int, containers: list[Obj]) -> Obj:
    template: Obj = {"metadata": {"labels": dict(match_labels)},
                     "spec": {"containers": [_container(c) for c in containers]}}
    spec: Obj = {"selector": {"matchLabels": dict(match_labels)}, "template": template}
    status: Obj = {}
    if kind in ("Deployment", "ReplicaSet", "StatefulSet"):
        spec["replicas"] = replicas
        status = {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                  "observedGeneration": 1}
    if kind == "Deployment":
        spec["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}
        spec["revisionHistoryLimit"] = 10
        status["updatedReplicas"] = replicas
    if kind == "StatefulSet":
        spec["serviceName"] = name
        spec["podManagementPolicy"] = "OrderedReady"
    if kind == "DaemonSet":
        status = {"currentNumberScheduled": replicas, "desiredNumberScheduled": replicas, "numberReady": replicas}
    if kind == "Job":
        spec["parallelism"] = 1
        spec["completions"] = 1
        spec["backoffLimit"] = 6
        template["spec"]["restartPolicy"] = "Never"
        status = {"active": replicas}
    return {"metadata": {"name": name, "namespace": ns, "generation": 1, "labels": dict(match_labels)},
            "spec": spec, "status": status}


def service(ns: str, name: str, selector: dict[str, str] | None, ports: list[Obj], cluster_ip: str) -> Obj:
    out_ports = []
    for p in ports:
        q = dict(p)
        q.setdefault("protocol", "TCP")
        q.setdefault("targetPort", q["port"])
        out_ports.append(q)
    svc: Obj = {
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP",
            "ports": out_ports,
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    }
    if selector is not None:  # a selector-less service has no field at all, not an empty one
        svc["spec"]["selector"] = dict(selector)
    return svc
