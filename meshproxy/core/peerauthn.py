"""PeerAuthentication resolution: which mTLS mode a workload's inbound port enforces (pure).

Theory of operation
-------------------
Istio (pilot/pkg/model/authentication.go, ComposePeerAuthentication) takes at most one policy
per level for a workload: the mesh level (the oldest selector-less policy of the root
namespace), the namespace level (the oldest selector-less policy of the workload's namespace)
and the workload level (the oldest policy of the workload's namespace whose selector labels
are a subset of the workload's labels; selector policies in the root namespace are ignored).
Starting from PERMISSIVE, each level in the order mesh -> namespace -> workload replaces the
mode unless its ``mtls.mode`` is UNSET (or absent). The workload-level policy's
``portLevelMtls`` then overrides the mode per port, an UNSET port inheriting the workload
result.

:class:`~meshproxy.config.security.PeerAuthnTable` already holds each level's candidates in
age order, so :func:`resolve_workload` is a dictionary lookup plus a scan of the workload's
namespace's selector policies; callers resolve once per snapshot and workload, then
:meth:`WorkloadMtls.mode_for` per connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshproxy.config.security import MtlsMode, PeerAuthnPolicy, PeerAuthnTable

DEFAULT_MODE = MtlsMode.PERMISSIVE


@dataclass(frozen=True, slots=True)
class WorkloadMtls:
    """The resolved modes of one workload: ``mode`` for every port not in ``per_port``.

    ``policies`` names the policies that contributed (mesh, namespace, workload order)."""

    mode: MtlsMode = DEFAULT_MODE
    per_port: Mapping[int, MtlsMode] = field(default_factory=dict)
    policies: tuple[str, ...] = ()

    def mode_for(self, port: int) -> MtlsMode:
        """The mode enforced on ``port`` (the workload's own, i.e. target, port)."""
        return self.per_port.get(port, self.mode)


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def workload_policy(
    table: PeerAuthnTable, namespace: str, labels: Mapping[str, str]
) -> PeerAuthnPolicy | None:
    """The oldest selector policy of ``namespace`` that selects ``labels``, if any."""
    for p in table.workload.get(namespace, ()):
        if _selects(p.selector, labels):
            return p
    return None


def resolve_workload(
    table: PeerAuthnTable, namespace: str, labels: Mapping[str, str]
) -> WorkloadMtls:
    """Every port's mode for the workload ``namespace`` / ``labels``."""
    mode = DEFAULT_MODE
    used: list[str] = []
    levels = (table.mesh, table.namespace_wide.get(namespace))
    for p in levels:
        if p is not None:
            used.append(p.name)
            if p.mode is not MtlsMode.UNSET:
                mode = p.mode
    wl = workload_policy(table, namespace, labels)
    if wl is None:
        return WorkloadMtls(mode=mode, policies=tuple(used))
    used.append(wl.name)
    if wl.mode is not MtlsMode.UNSET:
        mode = wl.mode
    per_port = {port: (mode if m is MtlsMode.UNSET else m) for port, m in wl.port_modes.items()}
    return WorkloadMtls(mode=mode, per_port=per_port, policies=tuple(used))


def resolve_mtls(
    policies: PeerAuthnTable, namespace: str, labels: Mapping[str, str], port: int
) -> MtlsMode:
    """The mode (STRICT, PERMISSIVE or DISABLE) enforced on ``port`` of the workload."""
    return resolve_workload(policies, namespace, labels).mode_for(port)
