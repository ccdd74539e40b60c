"""The ``meshproxy`` command line: argument parsing and dispatch, nothing else.

Theory of operation
-------------------
``main(argv)`` parses with argparse (which already exits 2 with a usage line on a bad flag)
and hands a typed :class:`RunOptions` to the composition root: :func:`meshproxy.app.run` for
one process, :func:`meshproxy.workers.supervise` for ``--workers N`` with N > 1. Value parsers
(:func:`parse_addr`, :func:`parse_labels`) raise ``argparse.ArgumentTypeError`` so a bad
value is reported like a bad flag. :class:`UsageError` raised later (a bad config at start-up,
a port in use) becomes exit code 2 with its message on stderr. Anything else that escapes is
a bug: it is logged with its traceback and the exit code is 1. No user mistake produces a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshproxy import __version__
from meshproxy.lifecycle import (
    STOP_ORDERS,
    AppProber,
    AppTarget,
    parse_app_probers,
    parse_app_target,
)
from meshproxy.settings import DEFAULT_SETTINGS

# meshproxy's default retry budget (Settings), as --retry-budget takes it
DEFAULT_RETRY_BUDGET: tuple[float, int] | None = (
    None
    if DEFAULT_SETTINGS.retry_budget_percent is None
    else (DEFAULT_SETTINGS.retry_budget_percent, DEFAULT_SETTINGS.retry_budget_min)
)

log = logging.getLogger("meshproxy")

Addr = tuple[str, int]

DEFAULT_OUTBOUND = "127.0.0.1:15001"
DEFAULT_ADMIN = "127.0.0.1:15000"
LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(Exception):
    """A user mistake found after argument parsing: exit 2, message on stderr."""


# --------------------------------------------------------------------------- value parsers


def parse_addr(text: str) -> Addr:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port). Port 0 means "let the OS choose"."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected [IPV6]:PORT")
        host, port_s = text[1:end], text[end + 2 :]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"{text!r}: an IPv6 address needs brackets, e.g. [::1]:15001"
            )
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r}: missing host")
    if not port_s.isdigit() or int(port_s) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port must be a number 0..65535")
    return host, int(port_s)


def format_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_line(
    outbound: Addr,
    admin: Addr,
    inbound: Addr | None = None,
    health: Addr | None = None,
    metrics: Addr | None = None,
) -> str:
    """The start-up line scripts wait for (printed on stdout once every listener is up);
    ``inbound=``, ``health=`` and ``metrics=`` only when that listener is on."""
    middle = "" if inbound is None else f" inbound={format_addr(inbound)}"
    line = f"listening outbound={format_addr(outbound)}{middle} admin={format_addr(admin)}"
    for name, addr in (("health", health), ("metrics", metrics)):
        if addr is not None:
            line += f" {name}={format_addr(addr)}"
    return line


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> dict (empty text -> {})."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {minimum}")
        return n

    return parse


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, e.g. 5 or 0.5") from None
    if not s >= 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number >= 0")
    return s


def parse_retry_budget(text: str) -> tuple[float, int] | None:
    """``PERCENT[:MIN]`` (e.g. ``20:3``) or ``off`` -> (percent, min concurrency) or None."""
    text = text.strip()
    if text == "off":
        return None
    pct_s, _, min_s = text.partition(":")
    try:
        pct = float(pct_s)
        minimum = int(min_s) if min_s else DEFAULT_SETTINGS.retry_budget_min
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PERCENT[:MIN] (e.g. 20:3) or off"
        ) from None
    if not 0 <= pct <= 100 or minimum < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: percent must be 0..100 and MIN >= 0")
    return pct, minimum


def format_retry_budget(budget: tuple[float, int] | None) -> str:
    return "off" if budget is None else f"{budget[0]:g}:{budget[1]}"


def _access_log_target(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file path, - (stdout) or off")
    return text


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything ``meshproxy run`` was asked to do, typed."""

    config: tuple[str, ...]
    control_plane: str | None = None  # subscribe to this control plane instead of --config
    node_id: str | None = None
    control_plane_ca: str | None = None  # root CA file verifying an https control plane
    token_file: str | None = None  # bootstrap token: certificates from the control plane
    outbound: Addr = ("127.0.0.1", 15001)
    admin: Addr = ("127.0.0.1", 15000)
    inbound: Addr | None = None  # the sidecar inbound listener (with ``app``)
    app: Addr | None = None  # the local application the inbound listener fronts
    cert_dir: str | None = None  # workload identity: cert.pem, key.pem, ca.pem
    workers: int = 1
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    drain_seconds: float = 5.0
    log_level: str = "info"
    access_log: str = "off"  # PATH, "-" (stdout) or "off"
    # beyond Istio's defaults (see Settings): the retry budget of clusters without one, the
    # outlier ejections a small pool may make, the idempotent-only 503 retry
    retry_budget: tuple[float, int] | None = DEFAULT_RETRY_BUDGET
    outlier_min_ejectable: int = DEFAULT_SETTINGS.outlier_min_ejectable
    idempotent_503_retry: bool = DEFAULT_SETTINGS.default_retry_503
    outbound_traffic_policy: str = DEFAULT_SETTINGS.outbound_traffic_policy
    reuse_port: bool = False  # set by the supervisor for its workers
    parent_pid: int | None = None  # a worker exits when its supervisor is gone
    own_ports: tuple[int, ...] = ()  # the supervisor's ports: never forwarded to by inbound
    # start-up and shutdown order (meshproxy.lifecycle)
    health: Addr | None = None  # GET /healthz/ready on its own listener (Istio's 15021)
    metrics: Addr | None = None  # GET /stats/prometheus on its own listener (Istio's 15090)
    min_drain_seconds: float = DEFAULT_SETTINGS.min_drain_seconds
    stop_order: str = "auto"  # auto: the sidecar order with --inbound, else the full drain
    exit_with_app: AppTarget | None = None  # drain and exit once the application is gone
    # --health also answers GET /app-health/<container>/<kind> by performing these probes
    app_probers: Mapping[str, AppProber] | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshproxy",
        description="A service-mesh sidecar proxy that speaks Istio's configuration.",
    )
    parser.add_argument("--version", action="version", version=f"meshproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="run the proxy",
        description="Run the proxy: standalone, reading Istio YAML from --config and "
        "re-applying it when the files change, or as a sidecar of a control plane "
        "(--control-plane URL --node-id ID).",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="PATH",
        help="Istio YAML file or directory (read recursively for *.yaml/*.yml); repeatable",
    )
    source.add_argument(
        "--control-plane",
        default=None,
        metavar="URL",
        help="subscribe to this control plane (http(s)://HOST:PORT of meshproxy control) "
        "instead of reading --config",
    )
    run.add_argument(
        "--node-id", default=None, metavar="ID", help="this proxy's name at the control plane"
    )
    run.add_argument(
        "--control-plane-ca",
        default=None,
        metavar="FILE",
        help="root CA file (the mesh CA's ca.pem) that an https control plane's certificate "
        "must chain to",
    )
    run.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="bootstrap token (meshproxy ca token): without --cert-dir, obtain this "
        "workload's certificate from the control plane and renew it at half its lifetime",
    )
    run.add_argument(
        "--outbound",
        type=parse_addr,
        default=DEFAULT_OUTBOUND,
        metavar="ADDR",
        help=f"outbound listener HOST:PORT (port 0: OS-chosen) [{DEFAULT_OUTBOUND}]",
    )
    run.add_argument(
        "--admin",
        type=parse_addr,
        default=DEFAULT_ADMIN,
        metavar="ADDR",
        help=f"admin API HOST:PORT [{DEFAULT_ADMIN}]",
    )
    run.add_argument(
        "--inbound",
        type=parse_addr,
        default=None,
        metavar="ADDR",
        help="the sidecar's inbound listener HOST:PORT, fronting --app: mTLS per "
        "PeerAuthentication, AuthorizationPolicy, x-forwarded-client-cert [off]",
    )
    run.add_argument(
        "--app",
        type=parse_addr,
        default=None,
        metavar="ADDR",
        help="the local application HOST:PORT the inbound listener forwards to",
    )
    run.add_argument(
        "--cert-dir",
        default=None,
        metavar="DIR",
        help="workload identity: DIR/cert.pem (leaf first, then intermediates), DIR/key.pem, "
        "DIR/ca.pem (trusted roots); re-read when the files change",
    )
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes sharing the outbound port (SO_REUSEPORT) [1]",
    )
    run.add_argument(
        "--namespace",
        default="default",
        metavar="NS",
        help="this workload's namespace (sourceNamespace matches, metrics) [default]",
    )
    run.add_argument(
        "--labels",
        type=parse_labels,
        default={},
        metavar="K=V,...",
        help="this workload's labels (sourceLabels matches, source_app/source_version metrics)",
    )
    run.add_argument(
        "--drain-seconds",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="on SIGTERM/SIGINT/quitquitquit, how long in-flight requests may take [5]",
    )
    run.add_argument(
        "--access-log",
        type=_access_log_target,
        default="off",
        metavar="PATH|-|off",
        help="one JSON object per request, appended to PATH, or on stdout with - [off]",
    )
    run.add_argument(
        "--retry-budget",
        type=parse_retry_budget,
        default=DEFAULT_RETRY_BUDGET,
        metavar="PCT[:MIN]|off",
        help="retry budget for clusters whose DestinationRule sets no retryBudget: at most "
        "PCT %% of active requests may be retries, never fewer than MIN; off = Istio's "
        "behaviour (no budget) [20:3]",
    )
    run.add_argument(
        "--outlier-min-ejectable",
        type=_non_negative_int,
        default=DEFAULT_SETTINGS.outlier_min_ejectable,
        metavar="N",
        help="with outlierDetection, a pool too small for maxEjectionPercent may still eject "
        "up to N endpoints (one always stays); 0 = Envoy's behaviour [1]",
    )
    run.add_argument(
        "--no-idempotent-503-retry",
        dest="idempotent_503_retry",
        action="store_false",
        help="routes without a retries block retry exactly as Istio's default policy "
        "(by default meshproxy also retries a 503 to GET/HEAD/OPTIONS/TRACE/PUT/DELETE)",
    )
    run.add_argument(
        "--min-drain-seconds",
        type=_seconds,
        default=DEFAULT_SETTINGS.min_drain_seconds,
        metavar="S",
        help="with --inbound, SIGTERM keeps the outbound listener serving the application and "
        "exits once no connection is open, but not before S seconds (Istio's "
        "MINIMUM_DRAIN_DURATION) nor after --drain-seconds [5]",
    )
    run.add_argument(
        "--stop-order",
        choices=STOP_ORDERS,
        default="auto",
        help="how SIGTERM/SIGINT stop: sidecar (as --min-drain-seconds says), drain (every "
        "listener refuses new connections at once), auto: sidecar with --inbound [auto]",
    )
    run.add_argument(
        "--health",
        type=parse_addr,
        default=None,
        metavar="ADDR",
        help="serve GET /healthz/ready (as /ready) on its own listener, e.g. 0.0.0.0:15021 [off]",
    )
    run.add_argument(
        "--metrics",
        type=parse_addr,
        default=None,
        metavar="ADDR",
        help="serve GET /stats/prometheus on its own listener, e.g. 0.0.0.0:15090 [off]",
    )
    run.add_argument(
        "--exit-with-app",
        type=parse_app_target,
        default=None,
        metavar="PID|pid:N|port:N|HOST:PORT",
        help="drain and exit 0 once the application is gone: its process has ended, or its "
        "port refuses connections after having accepted one (Jobs) [off]",
    )
    run.add_argument(
        "--app-probers",
        type=parse_app_probers,
        default=None,
        metavar="JSON",
        help="the application's original probes, as Istio's ISTIO_KUBE_APP_PROBERS: "
        '{"/app-health/<container>/readyz": {"httpGet": {"path": "/ready", "port": 8080}, '
        '"timeoutSeconds": 1}, ...}; --health answers each path by performing the probe '
        "against the application on localhost (written by meshproxy inject) [none]",
    )
    run.add_argument(
        "--outbound-traffic-policy",
        choices=("ALLOW_ANY", "REGISTRY_ONLY"),
        default=DEFAULT_SETTINGS.outbound_traffic_policy,
        help="a request redirected by meshproxy capture whose Host and original destination "
        "match no service: ALLOW_ANY forwards it to the original destination, REGISTRY_ONLY "
        "answers 502 (Istio's meshConfig.outboundTrafficPolicy.mode) [ALLOW_ANY]",
    )
    run.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="[info]")
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument(
        "--own-port",
        type=int,
        action="append",
        default=[],
        dest="own_ports",
        help=argparse.SUPPRESS,
    )

    val = sub.add_parser(
        "validate",
        help="check Istio YAML without running anything",
        description="Check Istio YAML. Prints one line per problem on stdout "
        "(FILE: Kind/name: field.path: message) and exits 1 when there is any; warnings go "
        "to stderr. Exit 0 when valid.",
    )
    val.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")

    from control.cli import add_control_parsers
    from meshproxy.ca_cli import add_ca_parser
    from meshproxy.k8s.capture_cli import add_capture_parser
    from meshproxy.lifecycle import add_wait_parser

    add_ca_parser(sub)
    add_capture_parser(sub)
    add_control_parsers(sub)
    from meshproxy.k8s.inject_cli import add_inject_parsers

    add_inject_parsers(sub)
    add_wait_parser(sub)
    return parser


def _check_paths(paths: Sequence[str]) -> None:
    for p in paths:
        if not os.path.exists(p):
            raise UsageError(f"{p}: no such file or directory")


def _check_source(opts: RunOptions) -> None:
    """Exactly one config source; the control-plane flags only with --control-plane."""
    if opts.control_plane is None:  # argparse made sure there is exactly one source
        for flag, value in (
            ("--node-id", opts.node_id),
            ("--control-plane-ca", opts.control_plane_ca),
            ("--token-file", opts.token_file),
        ):
            if value is not None:
                raise UsageError(f"{flag} goes with --control-plane")
        return
    if not opts.node_id:
        raise UsageError("--control-plane needs --node-id ID (this proxy's name)")
    from meshproxy.sources.stream import parse_control_url

    try:
        parse_control_url(opts.control_plane)
    except ValueError as e:
        raise UsageError(f"--control-plane {opts.control_plane}: {e}") from None
    files = (("--control-plane-ca", opts.control_plane_ca), ("--token-file", opts.token_file))
    for flag, path in files:
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file")
    if opts.token_file is not None and opts.cert_dir is not None:
        raise UsageError("--token-file and --cert-dir are exclusive: one identity source")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def _validate(paths: Sequence[str]) -> int:
    from control.istio import validate_paths

    report = validate_paths(list(paths))  # a missing path is one of the problems
    for w in report.warnings:
        print(w, file=sys.stderr)
    for p in report.problems:
        print(p)
    sys.stdout.flush()
    return 1 if report.problems else 0


def _run(ns: argparse.Namespace) -> int:
    opts = RunOptions(
        config=tuple(ns.config or ()),
        control_plane=ns.control_plane,
        node_id=ns.node_id,
        control_plane_ca=ns.control_plane_ca,
        token_file=ns.token_file,
        outbound=ns.outbound,
        admin=ns.admin,
        inbound=ns.inbound,
        app=ns.app,
        cert_dir=ns.cert_dir,
        workers=ns.workers,
        namespace=ns.namespace,
        labels=ns.labels,
        drain_seconds=ns.drain_seconds,
        log_level=ns.log_level,
        access_log=ns.access_log,
        retry_budget=ns.retry_budget,
        outlier_min_ejectable=ns.outlier_min_ejectable,
        idempotent_503_retry=ns.idempotent_503_retry,
        reuse_port=ns.reuse_port,
        parent_pid=ns.parent_pid,
        own_ports=tuple(ns.own_ports),
        outbound_traffic_policy=ns.outbound_traffic_policy,
        health=ns.health,
        metrics=ns.metrics,
        min_drain_seconds=ns.min_drain_seconds,
        stop_order=ns.stop_order,
        exit_with_app=ns.exit_with_app,
        app_probers=ns.app_probers,
    )
    _check_paths(opts.config)
    _check_source(opts)
    if (opts.inbound is None) != (opts.app is None):
        raise UsageError("--inbound and --app go together: the inbound listener fronts --app")
    if opts.cert_dir is not None and not os.path.isdir(opts.cert_dir):
        raise UsageError(f"--cert-dir {opts.cert_dir}: no such directory")
    if opts.exit_with_app is not None:
        from meshproxy.lifecycle import check_app_target

        check_app_target(opts.exit_with_app)
    setup_logging(opts.log_level)
    if opts.workers > 1:
        from meshproxy.workers import supervise

        return supervise(opts)
    from meshproxy.app import run

    return run(opts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``meshproxy`` / ``python -m meshproxy``; returns the exit code."""
    parser = build_parser()
    ns = parser.parse_args(argv)  # exits 2 on a bad flag or value
    try:
        if ns.command == "validate":
            return _validate(ns.paths)
        if ns.command == "ca":
            from meshproxy.ca_cli import run_ca

            return run_ca(ns)
        if ns.command == "capture":
            from meshproxy.k8s.capture_cli import run_capture

            return run_capture(ns)
        if ns.command == "control":
            from control.cli import run_control

            return run_control(ns)
        if ns.command == "wait":
            from meshproxy.lifecycle import run_wait

            return run_wait(ns)
        if ns.command == "inject":
            from meshproxy.k8s.inject_cli import run_inject

            return run_inject(ns)
        if ns.command == "webhook":
            from meshproxy.k8s.inject_cli import run_webhook

            return run_webhook(ns)
        if ns.command == "status":
            from control.cli import run_status

            return run_status(ns)
        return _run(ns)
    except UsageError as e:
        print(f"meshproxy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        logging.getLogger("meshproxy").exception("meshproxy: internal error")
        return 1
