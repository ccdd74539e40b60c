"""``meshproxy control`` and ``meshproxy status``: argparse wiring and the two commands.

Theory of operation
-------------------
:func:`add_control_parsers` registers both commands on :mod:`meshproxy.cli`'s subparsers.
``control`` loads DIR once synchronously (problems: exit 2 with one line per problem, like
every command's bad config at start-up) -- or, with ``--kubernetes``, starts the reflectors of
:mod:`control.kube`, whose first config comes once every watched kind is listed --,
optionally loads the CA (``--ca-dir``: signing and a TLS serving certificate), starts the
aiohttp server on ``--listen``, prints ``listening control=HOST:PORT`` (flushed) and watches
DIR (or the API) until SIGTERM/SIGINT, which close every stream and exit 0. ``status``
fetches ``/status`` and prints one row per proxy, like ``istioctl proxy-status``; ``--json``
prints the object as it came.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from typing import Any

from meshproxy.ca_cli import _ttl
from meshproxy.cli import LOG_LEVELS, UsageError, format_addr, parse_addr, setup_logging

log = logging.getLogger("meshproxy.control")

DEFAULT_LISTEN = "127.0.0.1:15010"


def add_control_parsers(sub: Any) -> None:
    ctl = sub.add_parser(
        "control",
        help="run the control plane",
        description="Watch DIR (Istio YAML) or, with --kubernetes, the Kubernetes API, validate "
        "the config, and push versioned per-proxy config to every proxy connected on "
        "/v1/stream; GET /status tells who runs what.",
    )
    source = ctl.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", action="append", metavar="DIR", help="Istio YAML; repeatable")
    source.add_argument(
        "--kubernetes",
        action="store_true",
        help="list and watch the Istio resources, Services, EndpointSlices and Pods of a "
        "Kubernetes API (in-cluster config when KUBERNETES_SERVICE_HOST is set, else kubeconfig)",
    )
    ctl.add_argument(
        "--kubeconfig",
        default=None,
        metavar="FILE",
        help="with --kubernetes: the kubeconfig file [$KUBECONFIG, else ~/.kube/config]",
    )
    ctl.add_argument(
        "--context", default=None, metavar="NAME", help="with --kubernetes: the kubeconfig context"
    )
    ctl.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="with --kubernetes: watch only this namespace; repeatable [all namespaces]",
    )
    ctl.add_argument(
        "--listen",
        type=parse_addr,
        default=DEFAULT_LISTEN,
        metavar="ADDR",
        help=f"HOST:PORT to serve on (port 0: OS-chosen) [{DEFAULT_LISTEN}]",
    )
    ctl.add_argument(
        "--ca-dir",
        default=None,
        metavar="DIR",
        help="the mesh CA (meshproxy ca init): sign workload CSRs on POST /v1/certificates "
        "and serve this API over TLS with a certificate from that CA",
    )
    ctl.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="with --ca-dir, a DNS name or IP proxies reach this control plane by, added to "
        "its serving certificate (besides the --listen host, localhost, 127.0.0.1, ::1); "
        "repeatable",
    )
    ctl.add_argument(
        "--cert-ttl",
        type=_ttl,
        default=timedelta(hours=24),
        metavar="DURATION",
        help="lifetime of the workload certificates it signs [24h]",
    )
    ctl.add_argument(
        "--debounce",
        type=float,
        default=0.1,
        metavar="S",
        help="quiet time after a file (or Kubernetes object) change before reloading [0.1]",
    )
    ctl.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="[info]")

    st = sub.add_parser(
        "status",
        help="which proxy runs which config (like istioctl proxy-status)",
        description="Ask a control plane which config version each connected proxy runs.",
    )
    st.add_argument("--control-plane", required=True, metavar="URL", help="http(s)://HOST:PORT")
    st.add_argument(
        "--control-plane-ca",
        default=None,
        metavar="FILE",
        help="root CA file to verify an https control plane (the mesh CA's ca.pem)",
    )
    st.add_argument("--json", action="store_true", help="print the /status object as is")


# --------------------------------------------------------------------------- control


def run_control(ns: argparse.Namespace) -> int:
    for p in ns.config or []:
        if not os.path.exists(p):
            raise UsageError(f"{p}: no such file or directory")
    if not ns.kubernetes:
        for flag, value in (("--kubeconfig", ns.kubeconfig), ("--context", ns.context),
                            ("--namespace", ns.namespace)):  # fmt: skip
            if value:
                raise UsageError(f"{flag} needs --kubernetes")
    elif ns.kubeconfig is not None and not os.path.isfile(ns.kubeconfig):
        raise UsageError(f"--kubeconfig {ns.kubeconfig}: no such file")
    if ns.ca_dir is not None and not os.path.isdir(ns.ca_dir):
        raise UsageError(f"--ca-dir {ns.ca_dir}: no such directory")
    if ns.debounce < 0:
        raise UsageError("--debounce must be >= 0")
    setup_logging(ns.log_level)
    import prometheus_client
    import uvloop

    prometheus_client.disable_created_metrics()  # no *_created series in /metrics

    return uvloop.run(_control_main(ns))


async def _control_main(ns: argparse.Namespace) -> int:
    from control.server import ControlPlane, ControlSettings

    signer = None
    serving = None
    ssl_ctx: ssl.SSLContext | None = None
    host, port = ns.listen
    if ns.ca_dir is not None:
        from certs.spiffe import CAError
        from control.signing import ServingCert, Signer, serving_hosts

        named = [] if host in ("", "0.0.0.0", "::") else [host]
        hosts = serving_hosts(*ns.server_name, *named)
        try:
            signer = await asyncio.to_thread(Signer.load, ns.ca_dir, ns.cert_ttl)
            serving = await asyncio.to_thread(ServingCert, signer.ca, hosts)
        except CAError as e:
            raise UsageError(f"--ca-dir: {e}") from None
        ssl_ctx = serving.context
    if ns.kubernetes:  # the first config comes once every watched kind is listed
        from control.kube import open_source

        kube = await open_source(ns)
        cp = ControlPlane(
            [], ControlSettings(debounce=ns.debounce), signer=signer, store=kube.store
        )
        kube.start()
    else:
        kube = None
        cp = ControlPlane(ns.config, ControlSettings(debounce=ns.debounce), signer=signer)
        outcome = await asyncio.to_thread(cp.load_initial)
        if outcome.config is None:
            raise UsageError("invalid config:\n" + "\n".join(f"  {p}" for p in outcome.problems))
    try:
        addr = await cp.start(host, port, ssl_ctx)
    except OSError as e:
        if kube is not None:
            await kube.close()
        raise UsageError(f"cannot listen on {format_addr(ns.listen)}: {e}") from None
    print(f"listening control={format_addr(addr)}", flush=True)
    log.info(
        "control plane on %s%s: %s",
        format_addr(addr),
        " (TLS)" if ssl_ctx is not None else "",
        "config from the Kubernetes API"
        if cp.config is None
        else f"config {cp.config.version}, {len(cp.config.resources)} resource(s)",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if kube is not None:
        tasks = [asyncio.create_task(kube.run(cp), name="kubernetes-source")]
    else:
        tasks = [asyncio.create_task(cp.watch(stop), name="config-watch")]
    if serving is not None:  # reissue our own certificate at half its lifetime
        tasks.append(asyncio.create_task(serving.run(), name="serving-cert"))
    await stop.wait()
    log.info("stopping")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if kube is not None:
        await kube.close()
    await cp.close()
    return 0


# --------------------------------------------------------------------------- status


def _age(since: str | None, now: float) -> str:
    if not since:
        return "-"
    try:
        t = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "-"
    s = max(0, int(now - t))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    """The ``meshproxy status`` table for a ``/status`` object."""
    now = time.time() if now is None else now
    rows = [("NODE", "NAMESPACE", "STATUS", "VERSION", "EXPECTED", "AGE")]
    for p in status.get("proxies", []):
        rows.append(
            (
                str(p.get("node_id", "")),
                str(p.get("namespace", "")),
                str(p.get("status", "")),
                str(p.get("acked_version") or "-"),
                str(p.get("expected_version") or "-"),
                _age(p.get("connected_since"), now),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    out = [f"control plane version {status.get('version') or '-'}", *lines]
    for p in status.get("proxies", []):
        if p.get("nacked"):
            out.append(f"NACK {p.get('node_id')}: {p['nacked']}")
    errors = status.get("errors") or []
    if errors:
        out.append(f"{len(errors)} config problem(s), not pushed:")
        out.extend(f"  {e}" for e in errors)
    return "\n".join(out)


def fetch_status(url: str, ca_file: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    from meshproxy.sources.stream import parse_control_url

    try:
        parsed = parse_control_url(url)
    except ValueError as e:
        raise UsageError(f"--control-plane {url}: {e}") from None
    base = parsed.base
    ctx = ssl.create_default_context(cafile=ca_file) if parsed.tls and ca_file else None
    try:
        with urllib.request.urlopen(base + "/status", timeout=timeout, context=ctx) as resp:
            data = resp.read()
    except urllib.error.HTTPError as e:
        raise UsageError(f"{base}/status answered {e.code}") from None
    except (urllib.error.URLError, OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(f"cannot reach the control plane at {base}: {reason}") from None
    try:
        obj = json.loads(data)
    except ValueError:
        raise UsageError(f"{base}/status did not answer JSON") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{base}/status did not answer a JSON object")
    return obj


def run_status(ns: argparse.Namespace) -> int:
    if ns.control_plane_ca is not None and not os.path.isfile(ns.control_plane_ca):
        raise UsageError(f"--control-plane-ca {ns.control_plane_ca}: no such file")
    status = fetch_status(ns.control_plane, ns.control_plane_ca)
    if ns.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    sys.stdout.flush()
    return 0
