"""Routing by original destination (transparent capture): ServiceEntry ``addresses`` -> host.

The pure lookup (:func:`host_for_address`) on hand-built tables, and the table the translation
builds from ServiceEntries (single VIPs, CIDRs, ports, the first entry winning, a VirtualService
still routing the host it finds).
"""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from control.istio import build_snapshot
from meshproxy.config.model import ProxyIdentity, RouteTable, Snapshot
from meshproxy.core.routing import find_virtual_host, host_for_address


def test_exact_address_and_port() -> None:
    table = RouteTable(addresses={"10.96.0.10": {80: "web.ns.svc.cluster.local"}})
    assert host_for_address(table, "10.96.0.10", 80) == "web.ns.svc.cluster.local"
    assert host_for_address(table, "10.96.0.10", 81) is None  # port not in the ServiceEntry
    assert host_for_address(table, "10.96.0.11", 80) is None
    assert host_for_address(table, "::ffff:10.96.0.10", 80) == "web.ns.svc.cluster.local"


def test_cidr_ranges_in_order_and_families() -> None:
    table = RouteTable(
        addresses={"10.1.2.3": {80: "exact.example"}},
        address_ranges=(
            (ipaddress.ip_network("10.1.0.0/16"), {80: "first.example"}),
            (ipaddress.ip_network("10.0.0.0/8"), {80: "second.example", 443: "tls.example"}),
            (ipaddress.ip_network("fd00::/8"), {80: "v6.example"}),
        ),
    )
    assert host_for_address(table, "10.1.2.3", 80) == "exact.example"  # exact wins
    assert host_for_address(table, "10.1.9.9", 80) == "first.example"
    assert host_for_address(table, "10.2.0.1", 80) == "second.example"
    assert host_for_address(table, "10.1.9.9", 443) == "tls.example"  # next range has the port
    assert host_for_address(table, "fd00::5", 80) == "v6.example"
    assert host_for_address(table, "192.168.0.1", 80) is None
    assert host_for_address(table, "not-an-ip", 80) is None


def test_empty_table() -> None:
    assert host_for_address(RouteTable(), "10.0.0.1", 80) is None


def _snapshot(tmp_path: Path, text: str) -> Snapshot:
    p = tmp_path / "mesh.yaml"
    p.write_text(textwrap.dedent(text))
    snap, report = build_snapshot([str(p)], ProxyIdentity(namespace="ns"))
    assert snap is not None, report.problems
    return snap


MESH = """\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: web, namespace: ns}
    spec:
      hosts: [web.ns.svc.cluster.local]
      addresses: [10.96.0.10, 10.97.0.0/16]
      ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: alt, protocol: HTTP}]
      resolution: STATIC
      endpoints: [{address: 10.0.0.2, ports: {http: 8080, alt: 8081}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: shadow, namespace: ns}
    spec:
      hosts: [shadow.ns.svc.cluster.local]
      addresses: [10.96.0.10]
      ports: [{number: 80, name: http, protocol: HTTP}, {number: 9090, name: m, protocol: HTTP}]
      resolution: STATIC
      endpoints: [{address: 10.0.0.3}]
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: novip, namespace: ns}
    spec:
      hosts: [novip.ns.svc.cluster.local]
      ports: [{number: 80, name: http, protocol: HTTP}]
      resolution: STATIC
      endpoints: [{address: 10.0.0.4}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: web, namespace: ns}
    spec:
      hosts: [web]
      http:
      - route: [{destination: {host: web, port: {number: 80}}}]
"""


def test_translation_builds_the_address_table(tmp_path: Path) -> None:
    table = _snapshot(tmp_path, MESH).routes
    assert table.addresses == {
        # the first ServiceEntry keeps 10.96.0.10:80; the second adds only its own port
        "10.96.0.10": {
            80: "web.ns.svc.cluster.local",
            8080: "web.ns.svc.cluster.local",
            9090: "shadow.ns.svc.cluster.local",
        }
    }
    assert table.address_ranges == (
        (
            ipaddress.ip_network("10.97.0.0/16"),
            {80: "web.ns.svc.cluster.local", 8080: "web.ns.svc.cluster.local"},
        ),
    )
    host = host_for_address(table, "10.97.3.4", 8080)
    assert host == "web.ns.svc.cluster.local"
    vh = find_virtual_host(table, host)
    assert vh is not None and vh.meta.kind == "VirtualService"  # the host's routing applies
    vh = find_virtual_host(table, host_for_address(table, "10.96.0.10", 9090) or "")
    assert vh is not None and vh.meta.kind == "ServiceEntry" and vh.meta.name == "shadow"


def test_no_addresses_no_table(tmp_path: Path) -> None:
    table = _snapshot(tmp_path, MESH.split("    ---\n")[2]).routes
    assert table.addresses == {} and table.address_ranges == ()


WIDE = """\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: wide, namespace: ns}
    spec:
      hosts: [wide.example]
      addresses: [10.0.0.0/8]
      ports: [{number: 443, name: tls, protocol: TLS}, {number: 5432, name: pg, protocol: TCP}]
      resolution: NONE
"""
NARROW = """\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: narrow, namespace: ns}
    spec:
      hosts: [narrow.example]
      addresses: [10.1.0.0/16]
      ports: [{number: 443, name: tls, protocol: TLS}]
      resolution: NONE
"""


@pytest.mark.parametrize(
    "docs", [(WIDE, NARROW), (NARROW, WIDE)], ids=["wide-first", "narrow-first"]
)
def test_overlapping_cidrs_match_the_longest_prefix_first(
    tmp_path: Path, docs: tuple[str, str]
) -> None:
    """Envoy's filter-chain match picks the most specific prefix, whatever the document order."""
    table = _snapshot(tmp_path, docs[0] + "    ---\n" + docs[1]).routes
    assert [net.prefixlen for net, _ in table.address_ranges] == [16, 8]
    assert host_for_address(table, "10.1.2.3", 443) == "narrow.example"
    assert host_for_address(table, "10.2.0.1", 443) == "wide.example"
    # the narrow range does not have the port: the wider one that does still matches
    assert host_for_address(table, "10.1.2.3", 5432) == "wide.example"
