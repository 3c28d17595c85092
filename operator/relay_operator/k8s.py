"""The one thin adapter between the operator and the Kubernetes API.

Everything the reconcile path reads or writes goes through `KubeApi`: get, list (with a label
selector, in pages of `page_size` items that follow the server's ``continue`` token and start
over when the token has expired), create, replace (PUT with optimistic concurrency), JSON merge
patch (RFC 7386) of an object or its ``/status`` subresource, delete (with a propagation policy
and uid/resourceVersion preconditions: the reconcile path deletes a StatefulSet it recreates
with ``Orphan``, keeping its pods, to grow its volume claims, and the spool claim of a removed
pod once it was verified empty, by uid; the garbage collector removes a MailRelay's children),
the server's version, and posting a core/v1 Event. It speaks the REST
paths directly over the `kubernetes` package's `ApiClient`, which brings configuration
(in-cluster service account or kubeconfig), authentication and TLS, and nothing else: no typed
models, no strategic merge patch, no server-side apply, so the write path is the same on every
API server (and in the test emulator).

HTTP failures become typed errors (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`,
`Forbidden`, `Expired`, `Unavailable`), chained to the library exception. This module decides nothing
about MailRelays; `reconcile` does. The functions here are blocking: kopf runs the operator's
synchronous handlers in its thread pool.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

JSON = dict[str, Any]
COMPONENT = "mailrelay-operator"


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    api_version: str  # "v1", "apps/v1", "mailrelay.dev/v1alpha1"
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        if subresource is not None:
            base += f"/{subresource}"
        return base


MAILRELAYS = Resource("mailrelay.dev/v1alpha1", "mailrelays", "MailRelay")
RELAYROUTES = Resource("mailrelay.dev/v1alpha1", "relayroutes", "RelayRoute")
CONFIGMAPS = Resource("v1", "configmaps", "ConfigMap")
SECRETS = Resource("v1", "secrets", "Secret")
SERVICES = Resource("v1", "services", "Service")
SERVICEACCOUNTS = Resource("v1", "serviceaccounts", "ServiceAccount")
PERSISTENTVOLUMECLAIMS = Resource("v1", "persistentvolumeclaims", "PersistentVolumeClaim")
STORAGECLASSES = Resource("storage.k8s.io/v1", "storageclasses", "StorageClass", namespaced=False)
CLUSTERKOPFPEERINGS = Resource("kopf.dev/v1", "clusterkopfpeerings", "ClusterKopfPeering", namespaced=False)
KOPFPEERINGS = Resource("kopf.dev/v1", "kopfpeerings", "KopfPeering")
EVENTS = Resource("v1", "events", "Event")
STATEFULSETS = Resource("apps/v1", "statefulsets", "StatefulSet")
PODDISRUPTIONBUDGETS = Resource("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget")
NETWORKPOLICIES = Resource("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy")
PODS = Resource("v1", "pods", "Pod")
JOBS = Resource("batch/v1", "jobs", "Job")

KNOWN_RESOURCES = (
    MAILRELAYS,
    RELAYROUTES,
    CONFIGMAPS,
    SECRETS,
    SERVICES,
    SERVICEACCOUNTS,
    PERSISTENTVOLUMECLAIMS,
    STORAGECLASSES,
    CLUSTERKOPFPEERINGS,
    KOPFPEERINGS,
    EVENTS,
    STATEFULSETS,
    PODDISRUPTIONBUDGETS,
    NETWORKPOLICIES,
    PODS,
    JOBS,
)


def resource_for(api_version: str, kind: str) -> Resource:
    """The `Resource` of a manifest's apiVersion and kind (only kinds the operator manages)."""
    for resource in KNOWN_RESOURCES:
        if resource.api_version == api_version and resource.kind == kind:
            return resource
    raise ValueError(f"the operator does not manage {api_version}/{kind}")


# --------------------------------------------------------------------------- errors


class KubeError(Exception):
    """An API request failed; `code` is the HTTP status (0 if no answer), `reason` the Status reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}" if code else message)
        self.code, self.reason, self.message = code, reason, message


class NotFound(KubeError):
    """The object does not exist (404): create it, or treat it as already gone."""


class AlreadyExists(KubeError):
    """A create met an existing object of that name (409 AlreadyExists): read and update it."""


class Conflict(KubeError):
    """A write lost an optimistic-concurrency race (409 Conflict): read again and retry."""


class Invalid(KubeError):
    """The server refused the object (422): a bug in the builders or a schema mismatch."""


class Forbidden(KubeError):
    """RBAC denied the request (403): the operator's role is missing a verb."""


class Expired(KubeError):
    """410 Gone: a resourceVersion or a list's continue token is older than the server keeps."""


class Unavailable(KubeError):
    """No usable answer: connection failure, timeout or a 5xx. Worth retrying."""


def error_from_response(code: int, body: bytes | str | None) -> KubeError:
    """The typed error for a non-2xx answer, from the metav1.Status body when there is one."""
    reason, message = "", ""
    try:
        status = json.loads(body or b"{}")
        if isinstance(status, dict):
            reason, message = str(status.get("reason") or ""), str(status.get("message") or "")
    except ValueError:
        message = (body.decode(errors="replace") if isinstance(body, bytes) else str(body or ""))[:500]
    if code == 404:
        return NotFound(code, reason or "NotFound", message)
    if code == 409:
        if reason == "AlreadyExists":
            return AlreadyExists(code, reason, message)
        return Conflict(code, reason or "Conflict", message)
    if code == 422:
        return Invalid(code, reason or "Invalid", message)
    if code == 410:
        return Expired(code, reason or "Expired", message)
    if code in (401, 403):
        return Forbidden(code, reason or "Forbidden", message)
    if code >= 500 or code == 429:
        return Unavailable(code, reason or "ServerError", message)
    return KubeError(code, reason or "BadRequest", message)


# --------------------------------------------------------------------------- the port


class KubeApi(Protocol):
    """What `reconcile` needs from the cluster."""

    def get(self, resource: Resource, namespace: str | None, name: str) -> JSON | None: ...

    def list(
        self, resource: Resource, namespace: str | None, label_selector: str | None = None
    ) -> list[JSON]: ...

    def create(self, resource: Resource, namespace: str | None, body: Mapping[str, Any]) -> JSON: ...

    def merge_patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> JSON: ...

    def replace(
        self, resource: Resource, namespace: str | None, name: str, body: Mapping[str, Any]
    ) -> JSON: ...

    def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        preconditions: Mapping[str, str] | None = None,
    ) -> None: ...

    def server_version(self) -> tuple[int, int] | None: ...

    def post_event(
        self, involved: Mapping[str, Any], *, type_: str, reason: str, message: str, action: str = "Reconcile"
    ) -> None: ...


# --------------------------------------------------------------------------- the adapter


class ClientKubeApi:
    """`KubeApi` over the `kubernetes` package's ApiClient (configuration, auth, TLS, pooling)."""

    def __init__(
        self,
        api_client: Any,
        *,
        timeout: float = 30.0,
        instance: str | None = None,
        page_size: int = 500,
    ) -> None:
        self._client = api_client
        self._timeout = timeout
        self._page_size = page_size
        self._instance = instance or os.environ.get("POD_NAME") or socket.gethostname()

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, context: str | None = None) -> ClientKubeApi:
        """In a pod: the service account. Elsewhere: `kubeconfig`, $KUBECONFIG or ~/.kube/config."""
        configuration = k8s_client.Configuration()
        try:
            if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
                k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=path,
                    context=context,
                    client_configuration=configuration,
                    persist_config=False,
                )
        except (k8s_config.ConfigException, OSError) as exc:
            raise KubeError(0, "Configuration", f"no usable Kubernetes configuration: {exc}") from exc
        return cls(k8s_client.ApiClient(configuration))

    def close(self) -> None:
        self._client.close()

    # -- transport ---------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> JSON:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            serialized = self._client.param_serialize(
                method,
                path,
                query_params=list(query),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self._client.call_api(*serialized, _request_timeout=self._timeout)
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(0, "Unavailable", f"{method} {path}: {exc}") from exc
        except k8s_client.ApiException as exc:  # raised by some transport paths
            raise error_from_response(int(exc.status or 0), exc.body) from exc
        if not 200 <= response.status <= 299:
            raise error_from_response(response.status, data)
        try:
            result = json.loads(data or b"{}")
        except ValueError as exc:
            raise Unavailable(response.status, "BadResponse", f"{method} {path}: not JSON") from exc
        return result if isinstance(result, dict) else {}

    # -- verbs -------------------------------------------------------------

    def get(self, resource: Resource, namespace: str | None, name: str) -> JSON | None:
        try:
            return self._request("GET", resource.path(namespace, name))
        except NotFound:
            return None

    def list(
        self, resource: Resource, namespace: str | None, label_selector: str | None = None
    ) -> list[JSON]:
        base = [("labelSelector", label_selector)] if label_selector else []
        base.append(("limit", str(self._page_size)))
        items: list[JSON] = []
        token = ""
        restarted = False
        while True:
            query = [*base, ("continue", token)] if token else base
            try:
                answer = self._request("GET", resource.path(namespace), query=query)
            except Expired:
                if not token or restarted:
                    raise
                # The continue token outlived the server's history: list again from the start.
                items, token, restarted = [], "", True
                continue
            items += [item for item in answer.get("items") or [] if isinstance(item, dict)]
            token = str((answer.get("metadata") or {}).get("continue") or "")
            if not token:
                break
        for item in items:  # typed lists omit these on a real server
            item.setdefault("apiVersion", resource.api_version)
            item.setdefault("kind", resource.kind)
        return items

    def create(self, resource: Resource, namespace: str | None, body: Mapping[str, Any]) -> JSON:
        return self._request("POST", resource.path(namespace), body=dict(body))

    def merge_patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> JSON:
        return self._request(
            "PATCH",
            resource.path(namespace, name, subresource),
            body=dict(patch),
            content_type="application/merge-patch+json",
        )

    def replace(self, resource: Resource, namespace: str | None, name: str, body: Mapping[str, Any]) -> JSON:
        """PUT: the whole object as given; pass metadata.resourceVersion to fail with `Conflict`
        instead of overwriting someone else's change."""
        return self._request("PUT", resource.path(namespace, name), body=dict(body))

    def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        preconditions: Mapping[str, str] | None = None,
    ) -> None:
        """DELETE with a propagation policy (Background, Foreground, Orphan) and optional
        preconditions (``uid``, ``resourceVersion``: a Conflict if the object changed). An object
        that is already gone is fine."""
        options: JSON = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if preconditions:
            options["preconditions"] = dict(preconditions)
        with contextlib.suppress(NotFound):
            self._request("DELETE", resource.path(namespace, name), body=options)

    def server_version(self) -> tuple[int, int] | None:
        """(major, minor) of the API server from /version; None when it does not say."""
        answer = self._request("GET", "/version")
        major = str(answer.get("major") or "").rstrip("+")
        minor = str(answer.get("minor") or "").rstrip("+")
        if major.isdigit() and minor.isdigit():
            return int(major), int(minor)
        return None

    def post_event(
        self, involved: Mapping[str, Any], *, type_: str, reason: str, message: str, action: str = "Reconcile"
    ) -> None:
        """A core/v1 Event about `involved` (as `kubectl describe` shows it). Best effort: an Event
        that cannot be posted is not worth failing a reconcile for."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'object')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "action": action,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance[:128],
        }
        with contextlib.suppress(KubeError):
            self.create(EVENTS, namespace, body)
