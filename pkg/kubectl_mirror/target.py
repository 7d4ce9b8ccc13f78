"""Resolve `TYPE/NAME` (or a label selector) to the running pod, container and port to capture on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .cluster import call
from .errors import ApiError, ClusterError, UsageError
from .kubeconfig import Connection
from .mesh import Mesh, detect

DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"


@dataclass(frozen=True, slots=True)
class PodTarget:
    namespace: str
    pod: str
    container: str
    port: int
    port_name: str | None  # the declared container port's name, when the port is a declared one
    pod_ip: str
    node: str
    mesh: Mesh | None = None  # the service mesh the pod is in (from its spec), if any


# ---- the API objects, as far as this tool reads them (pydantic: the boundary with the server's JSON) ----


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ObjectMeta(_Model):
    name: str
    namespace: str = ""
    uid: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    deletion_timestamp: str | None = Field(default=None, alias="deletionTimestamp")
    resource_version: str = Field(default="", alias="resourceVersion")


class ContainerPort(_Model):
    name: str | None = None
    container_port: int = Field(alias="containerPort")
    protocol: str = "TCP"


class Container(_Model):
    name: str
    image: str = ""
    ports: list[ContainerPort] = Field(default_factory=list)


class ContainerState(_Model):
    running: dict[str, Any] | None = None
    waiting: dict[str, Any] | None = None
    terminated: dict[str, Any] | None = None


class ContainerStatus(_Model):
    name: str
    ready: bool = False
    image: str = ""
    state: ContainerState = Field(default_factory=ContainerState)


class PodCondition(_Model):
    type: str
    status: str
    reason: str | None = None


class PodSpec(_Model):
    containers: list[Container] = Field(default_factory=list)
    ephemeral_containers: list[dict[str, Any]] = Field(default_factory=list, alias="ephemeralContainers")
    init_containers: list[dict[str, Any]] = Field(default_factory=list, alias="initContainers")
    node_name: str = Field(default="", alias="nodeName")
    os: dict[str, str] | None = None


class PodStatus(_Model):
    phase: str = "Unknown"
    reason: str | None = None
    pod_ip: str = Field(default="", alias="podIP")
    conditions: list[PodCondition] = Field(default_factory=list)
    container_statuses: list[ContainerStatus] = Field(default_factory=list, alias="containerStatuses")
    ephemeral_container_statuses: list[ContainerStatus] = Field(default_factory=list,
                                                                alias="ephemeralContainerStatuses")


class Pod(_Model):
    metadata: ObjectMeta
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)

    @property
    def ready(self) -> bool:
        return (self.status.phase == "Running" and self.metadata.deletion_timestamp is None
                and any(c.type == "Ready" and c.status == "True" for c in self.status.conditions))

    def describe_state(self) -> str:
        """A short state for messages: `Running, not ready`, `Pending: ImagePullBackOff`."""
        if self.metadata.deletion_timestamp:
            return "Terminating"
        waiting = [s.state.waiting.get("reason", "") for s in self.status.container_statuses
                   if s.state.waiting and s.state.waiting.get("reason")]
        text = self.status.phase + (f": {waiting[0]}" if waiting else "")
        if self.status.phase == "Running" and not self.ready:
            text += ", not ready"
        return text


class LabelSelector(_Model):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[dict[str, Any]] = Field(default_factory=list, alias="matchExpressions")

    def to_query(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for e in self.match_expressions:
            key, op, values = e.get("key", ""), e.get("operator", ""), e.get("values") or []
            if op == "In":
                parts.append(f"{key} in ({','.join(values)})")
            elif op == "NotIn":
                parts.append(f"{key} notin ({','.join(values)})")
            elif op == "Exists":
                parts.append(key)
            elif op == "DoesNotExist":
                parts.append(f"!{key}")
        return ",".join(parts)


class Workload(_Model):
    metadata: ObjectMeta
    spec: dict[str, Any] = Field(default_factory=dict)

    def selector(self) -> LabelSelector:
        return LabelSelector.model_validate(self.spec.get("selector") or {})


class ServicePort(_Model):
    name: str | None = None
    port: int
    target_port: int | str | None = Field(default=None, alias="targetPort")

    def label(self) -> str:
        target = self.target_port if self.target_port is not None else self.port
        return f"{self.name or self.port} ({self.port}->{target})"


class Service(_Model):
    metadata: ObjectMeta
    spec: dict[str, Any] = Field(default_factory=dict)

    @property
    def ports(self) -> list[ServicePort]:
        return [ServicePort.model_validate(p) for p in self.spec.get("ports") or []]


# ---- resource types ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    name: str  # kubectl's singular name
    plural: str  # as the server names it in messages: deployments.apps
    aliases: tuple[str, ...]
    path: str  # the object's REST path, a template over {namespace} and {name}


def _core(plural: str) -> str:
    return f"/api/v1/namespaces/{{namespace}}/{plural}/{{name}}"


def _group(group: str, plural: str) -> str:
    return f"/apis/{group}/v1/namespaces/{{namespace}}/{plural}/{{name}}"


KINDS: tuple[Kind, ...] = (
    Kind("pod", "pods", ("po", "pods"), _core("pods")),
    Kind("deployment", "deployments.apps", ("deploy", "deployments"), _group("apps", "deployments")),
    Kind("statefulset", "statefulsets.apps", ("sts", "statefulsets"), _group("apps", "statefulsets")),
    Kind("daemonset", "daemonsets.apps", ("ds", "daemonsets"), _group("apps", "daemonsets")),
    Kind("replicaset", "replicasets.apps", ("rs", "replicasets"), _group("apps", "replicasets")),
    Kind("job", "jobs.batch", ("jobs",), _group("batch", "jobs")),
    Kind("service", "services", ("svc", "services"), _core("services")),
)


def kind_for(type_name: str) -> Kind:
    t = type_name.lower()
    # kubectl also accepts the fully qualified form: deployments.apps, deploy.apps/v1 is not worth it.
    base = t.split(".", 1)[0]
    for kind in KINDS:
        if base == kind.name or base in kind.aliases:
            return kind
    supported = ", ".join(f"{k.name} ({k.aliases[0]})" if k.aliases[0] != k.plural else k.name for k in KINDS)
    raise UsageError(f'unknown resource type "{type_name}": use one of {supported}')


def parse_ref(ref: str) -> tuple[Kind, str]:
    """`deploy/web` -> (deployment, "web"); a bare `web` is a pod."""
    type_name, sep, name = ref.partition("/")
    if not sep:
        type_name, name = "pod", ref
    if not name or "/" in name:
        raise UsageError(f'invalid target "{ref}": expected TYPE/NAME (deploy/web) or a pod name')
    return kind_for(type_name), name


# ---- I/O --------------------------------------------------------------------------------------------


def _read(conn: Connection, kind: Kind, name: str, namespace: str) -> dict[str, Any]:
    return call(conn, "GET", kind.path, {"namespace": namespace, "name": name})


def list_pods(conn: Connection, namespace: str, selector: str) -> list[Pod]:
    listed = call(conn, "GET", "/api/v1/namespaces/{namespace}/pods", {"namespace": namespace},
                  query=[("labelSelector", selector)] if selector else ())
    return sorted((Pod.model_validate(item) for item in listed.get("items") or []), key=lambda p: p.metadata.name)


def _node_os(conn: Connection, pod: Pod) -> str | None:
    if pod.spec.os and pod.spec.os.get("name"):
        return pod.spec.os["name"]
    if not pod.spec.node_name:
        return None
    try:
        node = call(conn, "GET", "/api/v1/nodes/{name}", {"name": pod.spec.node_name})
    except ApiError:
        return None  # many users may not read nodes: then only spec.os can tell
    labels = (node.get("metadata") or {}).get("labels") or {}
    return str(labels.get("kubernetes.io/os") or "") or None


# ---- resolution -------------------------------------------------------------------------------------


def _pick_container(pod: Pod, container: str | None) -> Container:
    names = [c.name for c in pod.spec.containers]
    if container is not None:
        for c in pod.spec.containers:
            if c.name == container:
                return c
        raise UsageError(f'container "{container}" not found in pod {pod.metadata.name}; '
                         f"it has {', '.join(names)}: pick one with --container")
    default = pod.metadata.annotations.get(DEFAULT_CONTAINER_ANNOTATION)
    for c in pod.spec.containers:
        if c.name == default:
            return c
    if not pod.spec.containers:
        raise ClusterError(f"pod {pod.metadata.name} has no containers")
    return pod.spec.containers[0]


def _declared(pod: Pod, first: Container) -> list[ContainerPort]:
    """TCP ports the pod declares, the chosen container's first (the pod shares one network namespace)."""
    ordered = [first, *(c for c in pod.spec.containers if c.name != first.name)]
    return [p for c in ordered for p in c.ports if p.protocol == "TCP"]


def _port_label(p: ContainerPort) -> str:
    return f"{p.name} ({p.container_port})" if p.name else str(p.container_port)


def _resolve_port(pod: Pod, container: Container, port: str | int | None, what: str) -> tuple[int, str | None]:
    declared = _declared(pod, container)
    if port is None:
        own = [p for p in container.ports if p.protocol == "TCP"]
        choices = own or declared
        if len(choices) == 1:
            return choices[0].container_port, choices[0].name
        if not choices:
            raise UsageError(f"pod {pod.metadata.name} declares no ports: pick one with --port")
        raise UsageError(f"pod {pod.metadata.name} declares ports {', '.join(_port_label(p) for p in choices)}: "
                         "pick one with --port")
    if isinstance(port, int) or str(port).isdigit():
        number = int(port)
        if not 1 <= number <= 65535:
            raise UsageError(f"port {number} is out of range: expected 1 to 65535")
        name = next((p.name for p in declared if p.container_port == number), None)
        return number, name
    for p in declared:
        if p.name == port:
            return p.container_port, p.name
    listed = ", ".join(_port_label(p) for p in declared) or "none"
    raise UsageError(f'{what} "{port}" is not a port of pod {pod.metadata.name} (it declares {listed}): '
                     "pick one with --port")


def _service_port(svc: Service, port: str | None) -> str | int | None:
    """The container port a service sends to: targetPort of the service port picked by --port (name or number)."""
    ports = svc.ports
    name = svc.metadata.name
    chosen: ServicePort | None = None
    if port is None:
        if len(ports) == 1:
            chosen = ports[0]
        elif not ports:
            return None
        else:
            raise UsageError(f"service {name} exposes ports {', '.join(p.label() for p in ports)}: "
                             "pick one with --port")
    else:
        chosen = next((p for p in ports if p.name == port or str(p.port) == port), None)
        if chosen is None:
            return port  # not a service port: a container port, as kubectl port-forward allows
    return chosen.target_port if chosen.target_port is not None else chosen.port


def _target(conn: Connection, pod: Pod, container: str | None, port: str | int | None, what: str) -> PodTarget:
    if _node_os(conn, pod) == "windows":
        raise ClusterError(f"pod {pod.metadata.name} runs on Windows node {pod.spec.node_name}: "
                           "capturing needs a Linux node (ephemeral containers with tcpdump)")
    c = _pick_container(pod, container)
    number, port_name = _resolve_port(pod, c, port, what)
    return PodTarget(namespace=pod.metadata.namespace, pod=pod.metadata.name, container=c.name, port=number,
                     port_name=port_name, pod_ip=pod.status.pod_ip, node=pod.spec.node_name,
                     mesh=mesh_of(pod, c.name))


def mesh_of(pod: Pod, container: str | None = None) -> Mesh | None:
    """The service mesh `pod` is in, from the containers and annotations its injector left."""
    return detect({
        "metadata": {"annotations": pod.metadata.annotations, "labels": pod.metadata.labels},
        "spec": {"containers": [{"name": c.name} for c in pod.spec.containers],
                 "initContainers": pod.spec.init_containers},
    }, container)


def _states(pods: list[Pod]) -> str:
    shown = ", ".join(f"{p.metadata.name} ({p.describe_state()})" for p in pods[:5])
    return shown + (f" and {len(pods) - 5} more" if len(pods) > 5 else "")


@dataclass(frozen=True, slots=True)
class PodSelection:
    """The pods TYPE/NAME or -l stands for, before readiness or ports are looked at."""

    pods: list[Pod]
    source: str  # "deployment web", "selector app=web", "pod web-1": for messages
    query: str | None  # the label selector; None when a pod was named directly
    service: Service | None  # set for svc/NAME: its ports map --port to the pods' targetPort


def select_pods(conn: Connection, ref: str, selector: str | None) -> PodSelection:
    namespace = conn.namespace
    if selector is not None and not ref:
        return PodSelection(list_pods(conn, namespace, selector), f"selector {selector}", selector, None)
    if selector is not None:
        raise UsageError("give either TYPE/NAME or -l/--selector, not both")
    kind, name = parse_ref(ref)
    obj = _read(conn, kind, name, namespace)
    if kind.name == "pod":
        return PodSelection([Pod.model_validate(obj)], f"pod {name}", None, None)
    service: Service | None = None
    if kind.name == "service":
        service = Service.model_validate(obj)
        sel = service.spec.get("selector") or {}
        if not sel:
            raise ClusterError(f"service {name} has no selector, so no pods to follow; name a pod instead")
        query = ",".join(f"{k}={v}" for k, v in sorted(sel.items()))
    else:
        query = Workload.model_validate(obj).selector().to_query()
        if not query:
            raise ClusterError(f"{kind.name} {name} has no selector; name a pod instead")
    return PodSelection(list_pods(conn, namespace, query), f"{kind.name} {name}", query, service)


def resolve(conn: Connection, ref: str, *, selector: str | None, container: str | None, port: str | None,
            all_pods: bool) -> list[PodTarget]:
    """The pod(s) to capture on: the first Ready pod, or every Ready one with all_pods.

    `ref` is TYPE/NAME or a pod name; with `selector` (-l) `ref` may be empty and pods are picked by label.
    """
    return resolve_selection(conn, ref, selector=selector, container=container, port=port, all_pods=all_pods)[0]


def resolve_selection(conn: Connection, ref: str, *, selector: str | None, container: str | None,
                      port: str | None, all_pods: bool) -> tuple[list[PodTarget], PodSelection, list[Pod]]:
    """As resolve, plus the selection (to watch it) and the chosen pods' objects."""
    namespace = conn.namespace
    sel = select_pods(conn, ref, selector)
    if sel.query is None:
        pod = sel.pods[0]
        if pod.status.phase != "Running" or pod.metadata.deletion_timestamp:
            raise ClusterError(f"pod {pod.metadata.name} is not running ({pod.describe_state()}); "
                               "wait for it or pick another pod")
        return [_target(conn, pod, container, port, "--port")], sel, [pod]
    pods = sel.pods
    ready = [p for p in pods if p.ready]
    if not pods:
        raise ClusterError(f'no pods match {sel.source} (selector {sel.query}) in namespace "{namespace}"')
    if not ready:
        raise ClusterError(f'no ready pod for {sel.source} in namespace "{namespace}": found {_states(pods)}')
    chosen = ready if all_pods else ready[:1]
    return [target_for(conn, p, sel, container, port) for p in chosen], sel, chosen


def target_for(conn: Connection, pod: Pod, sel: PodSelection, container: str | None, port: str | None) -> PodTarget:
    """The capture target in one pod of the selection (also for pods that join it later)."""
    if sel.service is not None:
        return _target(conn, pod, container, _service_port(sel.service, port),
                       f"service {sel.service.metadata.name} targetPort")
    return _target(conn, pod, container, port, "--port")
