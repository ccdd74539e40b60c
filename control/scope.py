"""Per-proxy config scoping: the Istio documents that can influence one proxy's snapshot.

Theory of operation
-------------------
The control plane pushes each proxy only the validated resources its translation
(:func:`control.istio.translate`) can read, so a proxy's memory follows what it sees rather
than the whole mesh. The rule is an invariant, not a heuristic: for every resource set ``R``
and proxy ``p``, ``translate(scope_resources(R, p), p, version=v)`` has the same routes,
clusters and proxy as ``translate(R, p, version=v)``, and the inbound policy the data plane
derives for ``p`` from ``Snapshot.security`` (:func:`meshproxy.inbound.inbound_policy`: the
PeerAuthentication levels of :mod:`meshproxy.core.peerauthn`, the AuthorizationPolicies
:func:`meshproxy.core.authz.applies_to` selects) is the same. Only ``warnings`` may differ
(fewer: those about documents the proxy does not receive), and ``security`` holds fewer
policies, none of which applied to ``p``. What is kept mirrors the translation exactly:

* **ServiceEntry**: visible to the proxy's namespace (``exportTo``: empty or ``*`` = every
  namespace, ``.`` = its own, a name = that namespace; ``~`` = none), as ``build_registry``.
* **WorkloadEntry**: selected (labels) by the ``workloadSelector`` of a kept ServiceEntry of
  the same namespace.
* **VirtualService**: bound to ``mesh`` (no ``gateways`` or ``mesh`` among them), with hosts
  and ``http`` rules, visible to the proxy's namespace (``mesh_virtual_services``). Those
  whose rules all have ``sourceLabels`` excluding the proxy are kept: they still claim hosts.
* **DestinationRule** (``DestinationRuleIndex.lookup``: the proxy's namespace, then the
  service's, then ``istio-system``): in the proxy's namespace the rules visible to itself
  (all of them for a proxy in ``istio-system``); in another namespace ``M`` that is the
  namespace of a service the proxy can reach (a visible ServiceEntry's, or a visible
  VirtualService destination's) or ``istio-system``, every rule not private to ``M``, but only
  when at least one of them is exported to the proxy's namespace. The lookup picks the most
  specific host among non-private rules before dropping those not exported to the proxy, so
  an unexported rule can hide a less specific exported one (and send the lookup on to the
  next namespace): such rules are kept. Rules with a ``workloadSelector`` that does not pick
  the proxy are kept for the same reason: the translation drops them after the lookup, so
  they still shadow rules of later namespaces.
* **PeerAuthentication**: selector-less ones of ``istio-system`` (mesh level) and of the
  proxy's namespace (namespace level), and those of the proxy's namespace whose selector
  matches its labels (workload level). Selector policies of ``istio-system`` apply to no
  workload (``PeerAuthnTable``), so they are dropped.
* **AuthorizationPolicy**: those of the proxy's namespace and of ``istio-system`` whose
  selector (empty = all) matches its labels, except ``targetRef(s)`` ones, which bind to
  waypoints and gateways and are never translated for a sidecar. Dry-run ones are kept.

Everything keeps the input order (Istio's "oldest first" tie-breaker). A :class:`Scoper` is
built once per config: it indexes the resources by namespace and export target, so the
namespace-dependent part costs set unions over the resources a namespace sees, computed once
per distinct namespace; the label-dependent part (PeerAuthentication and AuthorizationPolicy
selectors) is a scan of that namespace's and the root's selector policies only.

The proxy re-validates what it receives (``cross_checks``), and ``check_references`` looks
up the DestinationRules of a route's subset from the VirtualService's own namespace, which may
need rules this proxy would not otherwise get (a rule exported to ``.`` only, in the
VirtualService's namespace, while the root has a ``*.local`` rule without that subset: the
check would then report the subset missing). So for every VirtualService it sends, the
scoping also sends the rules that check finds over the whole config. That never changes the
translation (see :meth:`Scoper._index_subset_checks`). One case remains: when the check's
service namespace for a host comes from a ServiceEntry the proxy cannot see (exported to the
VirtualService's namespace but not to the proxy's), the check may walk a different path on
the proxy; sending that entry would change the proxy's registry, so the proxy side must not
refuse a pushed config for a cross-resource subset check the control plane already passed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

from control.istio import hosts as H
from control.istio.resources import (
    AuthorizationPolicySpec,
    DestinationRuleSpec,
    PeerAuthenticationSpec,
    Resource,
    Resources,
    ServiceEntrySpec,
    VirtualServiceSpec,
    WorkloadEntrySpec,
)
from control.istio.validate import ROOT_NAMESPACE as DR_ROOT_NAMESPACE
from control.istio.validate import (
    DestinationRuleIndex,
    _route_destinations,
    service_namespace_resolver,
)
from meshproxy.config.model import ProxyIdentity
from meshproxy.config.security import ROOT_NAMESPACE

__all__ = ["Scoper", "scope_resources"]

T = TypeVar("T")


def scope_resources(resources: Resources, proxy: ProxyIdentity) -> Resources:
    """The subset of ``resources`` that can influence the snapshot translated for ``proxy``
    (pure, deterministic, in load order). For many proxies, build one :class:`Scoper`."""
    return Scoper(resources).for_proxy(proxy)


class _Exports:
    """Who sees a set of exported resources: positions visible from every namespace, and
    positions visible from each named namespace only (Istio ``exportTo``, see
    :func:`control.istio.validate.visible`)."""

    __slots__ = ("public", "targeted")

    def __init__(self) -> None:
        self.public: set[int] = set()
        self.targeted: dict[str, set[int]] = {}

    def add(self, pos: int, export_to: tuple[str, ...], owner_ns: str) -> None:
        if not export_to or "*" in export_to:
            self.public.add(pos)
            return
        for e in export_to:
            self.targeted.setdefault(owner_ns if e == "." else e, set()).add(pos)

    def only(self, ns: str) -> AbstractSet[int]:
        """Positions visible from ``ns`` and not public."""
        return self.targeted.get(ns, _EMPTY)


_EMPTY: frozenset[int] = frozenset()


def _private(r: Resource[DestinationRuleSpec]) -> bool:
    """Exported to its own namespace only (``DestinationRuleIndex``'s notion)."""
    e = r.spec.export_to
    return len(e) == 1 and e[0] in (".", r.namespace)


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pick(items: tuple[T, ...], positions: Iterable[int]) -> tuple[T, ...]:
    return tuple([items[i] for i in sorted(positions)])


class _NamespaceScope:
    """What a proxy of one namespace receives whatever its labels, and the security policies
    among which its labels choose."""

    __slots__ = (
        "ap_candidates",
        "destination_rules",
        "pa_candidates",
        "service_entries",
        "virtual_services",
        "workload_entries",
    )

    def __init__(
        self,
        virtual_services: tuple[Resource[VirtualServiceSpec], ...],
        destination_rules: tuple[Resource[DestinationRuleSpec], ...],
        service_entries: tuple[Resource[ServiceEntrySpec], ...],
        workload_entries: tuple[Resource[WorkloadEntrySpec], ...],
        pa_candidates: tuple[tuple[Resource[PeerAuthenticationSpec], Mapping[str, str]], ...],
        ap_candidates: tuple[tuple[Resource[AuthorizationPolicySpec], Mapping[str, str]], ...],
    ) -> None:
        self.virtual_services = virtual_services
        self.destination_rules = destination_rules
        self.service_entries = service_entries
        self.workload_entries = workload_entries
        self.pa_candidates = pa_candidates
        self.ap_candidates = ap_candidates


class Scoper:
    """Scoping for one config, indexed once: :meth:`for_proxy` per proxy.

    Results are memoized per namespace (the label-independent part) and per identity
    (``(namespace, labels)``; the same identity gets the very same :class:`Resources`
    object, so a caller can compare by identity). Not thread-safe; the resources it was built
    from must not change (they are frozen)."""

    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        self._by_ns: dict[str, _NamespaceScope] = {}
        self._by_identity: dict[tuple[str, frozenset[tuple[str, str]]], Resources] = {}
        self._index_registry(resources)
        self._index_destination_rules(resources.destination_rules)
        self._index_subset_checks(resources)
        self._index_security(resources)

    # ------------------------------------------------------------------ indexes

    def _index_registry(self, res: Resources) -> None:
        # ServiceEntries: exportTo with "~" is exported nowhere (build_registry skips it)
        self._se = _Exports()
        for i, se in enumerate(res.service_entries):
            if "~" not in se.spec.export_to:
                self._se.add(i, se.spec.export_to, se.namespace)
        # VirtualServices the translation reads (mesh_virtual_services), and the namespaces
        # of the services their destinations name (for the DestinationRule lookup)
        self._vs = _Exports()
        self._vs_dest_ns: list[frozenset[str]] = []
        self._vs_usable: list[bool] = []
        for i, vs in enumerate(res.virtual_services):
            s = vs.spec
            usable = not (s.gateways and "mesh" not in s.gateways) and bool(s.hosts and s.http)
            self._vs_usable.append(usable)
            if usable:
                self._vs.add(i, s.export_to, vs.namespace)
            self._vs_dest_ns.append(_destination_namespaces(vs) if usable else frozenset())
        # WorkloadEntries selected by each ServiceEntry (same namespace, labels)
        wes_by_ns: dict[str, list[int]] = {}
        by_label: dict[tuple[str, str, str], list[int]] = {}
        for j, we in enumerate(res.workload_entries):
            wes_by_ns.setdefault(we.namespace, []).append(j)
            for k, v in we.spec.labels.items():
                by_label.setdefault((we.namespace, k, v), []).append(j)
        wes = res.workload_entries
        self._se_wes: list[tuple[int, ...]] = []
        for se in res.service_entries:
            ws = se.spec.workload_selector
            if ws is None:
                self._se_wes.append(())
                continue
            sel = ws.labels
            if not sel:
                self._se_wes.append(tuple(wes_by_ns.get(se.namespace, ())))
                continue
            # candidates: the entries with the selector's rarest label, then the full check
            first = min(sel.items(), key=lambda kv: len(by_label.get((se.namespace, *kv), ())))
            cands = by_label.get((se.namespace, *first), ())
            self._se_wes.append(tuple(j for j in cands if _selects(sel, wes[j].spec.labels)))
        # the public part, shared by every namespace
        ses = res.service_entries
        self._public_svc_ns: frozenset[str] = frozenset(
            {ses[i].namespace for i in self._se.public}
        ).union(*(self._vs_dest_ns[i] for i in self._vs.public))
        self._public_wes: frozenset[int] = frozenset().union(
            *(self._se_wes[i] for i in self._se.public)
        )

    def _index_destination_rules(self, rules: tuple[Resource[DestinationRuleSpec], ...]) -> None:
        self._dr_all: dict[str, set[int]] = {}  # by namespace, every rule with a host
        self._dr_self: dict[str, set[int]] = {}  # by namespace, rules visible to their own
        self._dr_nonprivate: dict[str, set[int]] = {}  # by namespace, rules not private
        self._dr_public_ns: set[str] = set()  # namespaces with a rule exported everywhere
        self._dr_exported_to: dict[str, set[str]] = {}  # ns -> namespaces with a rule for it
        for i, r in enumerate(rules):
            if r.spec.host is None:
                continue  # the index ignores it
            ns, e = r.namespace, r.spec.export_to
            self._dr_all.setdefault(ns, set()).add(i)
            if not e or "*" in e or "." in e or ns in e:
                self._dr_self.setdefault(ns, set()).add(i)
            if _private(r):
                continue
            self._dr_nonprivate.setdefault(ns, set()).add(i)
            if not e or "*" in e:
                self._dr_public_ns.add(ns)
            for t in e:
                if t not in (".", "*"):
                    self._dr_exported_to.setdefault(t, set()).add(ns)

    def _index_subset_checks(self, res: Resources) -> None:
        """For each VirtualService the translation reads, the DestinationRules that
        ``check_references`` finds for its subset destinations, looked up from the
        VirtualService's own namespace over the whole config (as the control plane validated
        it). A proxy re-validates what it receives; with these rules a route's subsets are
        found there too. Adding them never changes the proxy's translation: a rule of a
        namespace other than the proxy's and the root is private (never read from elsewhere)
        or not private, and then either its namespace already contributes every non-private
        rule or none of them is exported to the proxy (all dropped after the lookup)."""
        self._vs_check: list[frozenset[int]] = [frozenset()] * len(res.virtual_services)
        self._public_vs_check: frozenset[int] = frozenset()
        if not res.destination_rules:
            return
        index = DestinationRuleIndex(res.destination_rules)
        pos = {id(r): i for i, r in enumerate(res.destination_rules)}
        # check_references' view of a host's namespace
        service_namespace = service_namespace_resolver(res.service_entries)

        memo: dict[tuple[str, str], frozenset[int]] = {}
        for i, vs in enumerate(res.virtual_services):
            if not self._vs_usable[i]:
                continue  # never sent
            got: set[int] = set()
            for _path, d in _route_destinations(vs.spec):
                if not d.subset or not d.host:
                    continue
                host = H.expand(d.host, vs.namespace)
                key = (host, vs.namespace)
                rules = memo.get(key)
                if rules is None:
                    rules = memo[key] = frozenset(
                        pos[id(r)]
                        for r in index.lookup(
                            host, vs.namespace, service_namespace(host, vs.namespace)
                        )
                        if r.spec.workload_selector is None or r.namespace == vs.namespace
                    )
                got |= rules
            self._vs_check[i] = frozenset(got)
        self._public_vs_check = frozenset().union(*(self._vs_check[i] for i in self._vs.public))

    def _index_security(self, res: Resources) -> None:
        # PeerAuthentication: (position, selector) of the selector-less policies by namespace
        # and of the selector ones outside the root namespace
        self._pa_wide: dict[str, list[int]] = {}
        self._pa_workload: dict[str, list[int]] = {}
        self._pa_sel: list[Mapping[str, str]] = []
        for i, pa in enumerate(res.peer_authentications):
            sel = pa.spec.selector.match_labels if pa.spec.selector is not None else {}
            self._pa_sel.append(sel)
            if not sel:
                self._pa_wide.setdefault(pa.namespace, []).append(i)
            elif pa.namespace != ROOT_NAMESPACE:
                self._pa_workload.setdefault(pa.namespace, []).append(i)
        # AuthorizationPolicy: the ones a sidecar enforces, by namespace
        self._ap: dict[str, list[int]] = {}
        self._ap_sel: list[Mapping[str, str]] = []
        for i, ap in enumerate(res.authorization_policies):
            s = ap.spec
            self._ap_sel.append(s.selector.match_labels if s.selector is not None else {})
            if s.target_ref is not None or s.target_refs:
                continue  # translate_security leaves it out
            self._ap.setdefault(ap.namespace, []).append(i)

    # ------------------------------------------------------------------ queries

    def for_proxy(self, proxy: ProxyIdentity) -> Resources:
        """The resources that can influence ``proxy``'s snapshot, in load order."""
        labels = proxy.labels
        key = (proxy.namespace, frozenset(labels.items()))
        got = self._by_identity.get(key)
        if got is not None:
            return got
        scope = self.for_namespace(proxy.namespace)
        got = Resources(
            virtual_services=scope.virtual_services,
            destination_rules=scope.destination_rules,
            service_entries=scope.service_entries,
            workload_entries=scope.workload_entries,
            peer_authentications=tuple(
                [r for r, sel in scope.pa_candidates if _selects(sel, labels)]
            ),
            authorization_policies=tuple(
                [r for r, sel in scope.ap_candidates if _selects(sel, labels)]
            ),
        )
        self._by_identity[key] = got
        return got

    def for_namespace(self, ns: str) -> _NamespaceScope:
        """The label-independent part of the scope of a proxy in ``ns`` (memoized)."""
        got = self._by_ns.get(ns)
        if got is None:
            got = self._by_ns[ns] = self._namespace_scope(ns)
        return got

    def _namespace_scope(self, ns: str) -> _NamespaceScope:
        res = self.resources
        se_only = self._se.only(ns)
        vs_only = self._vs.only(ns)
        se_pos = self._se.public | se_only
        vs_pos = self._vs.public | vs_only
        # WorkloadEntries of the visible ServiceEntries
        we_pos = set(self._public_wes)
        for i in se_only:
            we_pos.update(self._se_wes[i])
        # namespaces of the services this proxy can reach
        ses = res.service_entries
        svc_ns = set(self._public_svc_ns)
        svc_ns.update(ses[i].namespace for i in se_only)
        for i in vs_only:
            svc_ns |= self._vs_dest_ns[i]
        dr_pos = self._destination_rules_for(ns, svc_ns)
        dr_pos |= self._public_vs_check
        for i in vs_only:
            dr_pos |= self._vs_check[i]
        return _NamespaceScope(
            virtual_services=_pick(res.virtual_services, vs_pos),
            destination_rules=_pick(res.destination_rules, dr_pos),
            service_entries=_pick(res.service_entries, se_pos),
            workload_entries=_pick(res.workload_entries, we_pos),
            pa_candidates=self._pa_candidates(ns),
            ap_candidates=self._ap_candidates(ns),
        )

    def _destination_rules_for(self, ns: str, svc_ns: set[str]) -> set[int]:
        """Positions of the DestinationRules the lookups of a proxy in ``ns`` can meet."""
        if ns == DR_ROOT_NAMESPACE:
            out = set(self._dr_all.get(ns, ()))  # step 1 reads private ones, step 3 the rest
        else:
            out = set(self._dr_self.get(ns, ()))
        svc_ns.add(DR_ROOT_NAMESPACE)
        svc_ns.discard(ns)
        exported = self._dr_exported_to.get(ns, _EMPTY_NS)
        for m in svc_ns:
            # a namespace none of whose rules is exported to ns yields nothing: every rule
            # the lookup picks there is then dropped for visibility
            if m in self._dr_public_ns or m in exported:
                out |= self._dr_nonprivate.get(m, _EMPTY)
        return out

    def _pa_candidates(
        self, ns: str
    ) -> tuple[tuple[Resource[PeerAuthenticationSpec], Mapping[str, str]], ...]:
        pos = list(self._pa_wide.get(ROOT_NAMESPACE, ()))
        if ns != ROOT_NAMESPACE:
            pos += self._pa_wide.get(ns, ())
            pos += self._pa_workload.get(ns, ())
        pas = self.resources.peer_authentications
        return tuple([(pas[i], self._pa_sel[i]) for i in sorted(pos)])

    def _ap_candidates(
        self, ns: str
    ) -> tuple[tuple[Resource[AuthorizationPolicySpec], Mapping[str, str]], ...]:
        pos = list(self._ap.get(ROOT_NAMESPACE, ()))
        if ns != ROOT_NAMESPACE:
            pos += self._ap.get(ns, ())
        aps = self.resources.authorization_policies
        return tuple([(aps[i], self._ap_sel[i]) for i in sorted(pos)])

    def __repr__(self) -> str:
        return (
            f"Scoper({len(self.resources)} resources, {len(self._by_ns)} namespaces, "
            f"{len(self._by_identity)} identities scoped)"
        )


_EMPTY_NS: frozenset[str] = frozenset()


def _destination_namespaces(vs: Resource[VirtualServiceSpec]) -> frozenset[str]:
    """The namespace of the service each destination and mirror of ``vs`` names, as the
    translation gives it to a host outside the registry (``namespace_of(host)`` or the
    VirtualService's own); a host inside the registry has its ServiceEntry's namespace, which
    the visible entries already contribute."""
    out: set[str] = set()
    for r in vs.spec.http:
        dests: list[Any] = [rd.destination for rd in r.route if rd.destination is not None]
        dests += [m.destination for m in r.mirrors if m.destination is not None]
        if r.mirror is not None:
            dests.append(r.mirror)
        for d in dests:
            host = H.expand(d.host or "", vs.namespace)
            out.add(H.namespace_of(host) or vs.namespace)
    return frozenset(out)
