"""``meshproxy capture``: install (or ``--clean``) the transparent-capture rules in this network
namespace.

Theory of operation
-------------------
The edge of :mod:`meshproxy.k8s.capture`: parse the flags (a bad value is a usage error, exit 2,
naming the flag), render the rules, and apply them with the ``iptables-restore`` /
``iptables-save`` pair found on ``PATH`` (whatever backend the system's ``iptables`` is:
nf_tables or legacy; ``--iptables-backend`` picks ``iptables-nft-*`` / ``iptables-legacy-*``
explicitly). Capturing is "clean, then install", each one ``iptables-restore --noflush`` call
(atomic per table), so capturing twice leaves exactly one copy of the rules; ``--clean`` removes
only our chains and the jumps to them, and does nothing when they are absent. ``--dry-run``
prints what would be applied and touches nothing.

IPv4 always; IPv6 (``ip6tables``, Istio's ``--enable-ipv6``) with ``--ipv6``, for a dual-stack
pod whose sidecar listens on IPv6 too (``--outbound [::1]:15001`` or a second worker set):
capturing IPv6 towards a proxy that only listens on 127.0.0.1 would break the application's
IPv6 connections, so it is not the default. ``--clean`` cleans both families.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from typing import Any

from meshproxy.cli import UsageError
from meshproxy.k8s.capture import (
    CHAINS,
    CaptureError,
    CaptureOptions,
    capture_rules,
    clean_rules,
)
from meshproxy.k8s.capture import parse_options as parse_capture_options

__all__ = ["add_capture_parser", "run_capture"]

BACKENDS = ("auto", "nft", "legacy")
RESTORE_TIMEOUT = 30.0  # seconds for one iptables-save / iptables-restore call


def add_capture_parser(sub: Any) -> None:
    p = sub.add_parser(
        "capture",
        help="install the iptables rules that send the pod's TCP traffic through the sidecar",
        description="Install istio-iptables' nat rules in this network namespace: outbound TCP "
        "to --proxy-port except the proxy's own uid/gid and loopback, inbound TCP to "
        "--inbound-port except 15090/15021/15020 and --exclude-inbound-ports. Needs "
        "CAP_NET_ADMIN (an init container). Lists are comma-separated.",
    )
    p.add_argument("--proxy-port", default="15001", metavar="PORT", help="outbound [15001]")
    p.add_argument("--inbound-port", default="15006", metavar="PORT", help="inbound [15006]")
    p.add_argument("--proxy-uid", default="1337", metavar="UID[,UID]", help="[1337]")
    p.add_argument("--proxy-gid", default="1337", metavar="GID[,GID]", help="[1337]")
    p.add_argument(
        "--include-outbound-cidrs",
        default="*",
        metavar="CIDRS",
        help="outbound destinations to capture; * = all, empty = none [*]",
    )
    p.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDRS", help="[none]")
    p.add_argument(
        "--include-inbound-ports",
        default="*",
        metavar="PORTS",
        help="inbound ports to capture; * = all, empty = none [*]",
    )
    p.add_argument("--exclude-inbound-ports", default="", metavar="PORTS", help="[none]")
    p.add_argument("--exclude-outbound-ports", default="", metavar="PORTS", help="[none]")
    p.add_argument(
        "--ipv6", action="store_true", help="capture IPv6 too (ip6tables); IPv4 only by default"
    )
    p.add_argument(
        "--iptables-backend",
        choices=BACKENDS,
        default="auto",
        help="auto: the system's iptables-restore; nft / legacy: iptables-{nft,legacy}-restore",
    )
    p.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    p.add_argument("--clean", action="store_true", help="remove the rules installed by capture")


def _binaries(backend: str, ipv6: bool) -> tuple[str, str]:
    prefix = "ip6tables" if ipv6 else "iptables"
    mid = "" if backend == "auto" else f"-{backend}"
    return f"{prefix}{mid}-save", f"{prefix}{mid}-restore"


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=RESTORE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{argv[0]}: {e}") from None
    if done.returncode != 0:
        err = (done.stderr or done.stdout).strip().replace("\n", " | ")
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {err}")
    return done.stdout


def _clean(save: str, restore: str) -> bool:
    """Remove our chains from one family; True if there was anything to remove."""
    text = clean_rules(_run([save, "-t", "nat"]))
    if text is None:
        return False
    _run([restore, "--noflush"], text)
    return True


def _options(ns: argparse.Namespace) -> CaptureOptions:
    try:
        return parse_capture_options(
            proxy_port=ns.proxy_port,
            inbound_port=ns.inbound_port,
            proxy_uid=ns.proxy_uid,
            proxy_gid=ns.proxy_gid,
            include_outbound_cidrs=ns.include_outbound_cidrs,
            exclude_outbound_cidrs=ns.exclude_outbound_cidrs,
            include_inbound_ports=ns.include_inbound_ports,
            exclude_inbound_ports=ns.exclude_inbound_ports,
            exclude_outbound_ports=ns.exclude_outbound_ports,
        )
    except CaptureError as e:
        raise UsageError(str(e)) from None


def run_capture(ns: argparse.Namespace) -> int:
    """``meshproxy capture``; returns the exit code (a bad flag value raises UsageError)."""
    opts = _options(ns)
    families = (False, True) if ns.ipv6 else (False,)
    if ns.dry_run:
        if ns.clean:
            print("# --clean: delete the jumps to and the chains " + ", ".join(CHAINS))
            return 0
        for v6 in families:
            print(f"# {_binaries(ns.iptables_backend, v6)[1]} --noflush")
            sys.stdout.write(capture_rules(opts, ipv6=v6))
        sys.stdout.flush()
        return 0
    try:
        if ns.clean:
            for v6 in (False, True):
                save, restore = _binaries(ns.iptables_backend, v6)
                if v6 and not (shutil.which(save) and shutil.which(restore)):
                    continue  # no ip6tables here: nothing of ours can be there either
                removed = _clean(save, restore)
                family = "ip6tables" if v6 else "iptables"
                print(f"{family}: {'removed' if removed else 'nothing to remove'}")
            return 0
        for v6 in families:
            save, restore = _binaries(ns.iptables_backend, v6)
            _clean(save, restore)
            _run([restore, "--noflush"], capture_rules(opts, ipv6=v6))
            print(f"{'ip6tables' if v6 else 'iptables'}: capture installed")
    except RuntimeError as e:
        print(f"meshproxy capture: {e}", file=sys.stderr)
        return 1
    return 0
