"""``meshproxy ca init|issue|token``: argparse wiring and the handlers, nothing more.

Theory of operation
-------------------
:func:`add_ca_parser` registers ``ca`` and its three subcommands on the top-level
subparsers of :mod:`meshproxy.cli`; :func:`run_ca` is what ``cli.main`` dispatches to. Each
handler calls the plain functions of :mod:`certs` (this is a one-shot process, so blocking is
fine here) and prints one line on stdout naming what it wrote, or the token itself. A user
mistake surfaces as :class:`certs.spiffe.CAError` and becomes exit code 2 with
``meshproxy ca <command>: <message>`` on stderr -- never a traceback. A ``--ttl`` that does not
parse is rejected by argparse the same way (exit 2, ``meshproxy ca issue: error: ...``).
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import Any

from certs.spiffe import DEFAULT_TRUST_DOMAIN, CAError, format_duration, parse_duration

DEFAULT_TTL = "24h"


def _ttl(text: str) -> timedelta:
    try:
        return parse_duration(text, "TTL")
    except CAError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_ca_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``ca`` (with ``init``, ``issue``, ``token``) to ``sub``, the top-level
    ``add_subparsers()`` object."""
    ca = sub.add_parser(
        "ca",
        help="the mesh certificate authority",
        description="Create the mesh CA, issue SPIFFE workload certificates, print bootstrap "
        "tokens.",
    )
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND")
    ca_sub.required = True

    init = ca_sub.add_parser(
        "init",
        help="create a root CA",
        description="Create a mesh root CA in DIR: ca.pem, ca-key.pem (0600), token.key "
        "(0600), ca.json; with --intermediate also intermediate.pem and intermediate-key.pem, "
        "which then sign every workload certificate so ca-key.pem can be kept offline.",
    )
    init.add_argument("--dir", required=True, metavar="DIR", help="the CA directory")
    init.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        metavar="TD",
        help=f"the SPIFFE trust domain [{DEFAULT_TRUST_DOMAIN}]",
    )
    init.add_argument(
        "--intermediate", action="store_true", help="also create an intermediate signing CA"
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA in DIR")

    iss = ca_sub.add_parser(
        "issue",
        help="issue a workload certificate",
        description="Issue a workload certificate for a SPIFFE id: OUTDIR/cert.pem (the "
        "certificate, then the intermediate if any), OUTDIR/key.pem (0600) and OUTDIR/ca.pem "
        "(the root a peer verifies against).",
    )
    iss.add_argument("--dir", required=True, metavar="DIR", help="the CA directory")
    iss.add_argument(
        "--spiffe-id",
        required=True,
        metavar="ID",
        help="spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
    )
    iss.add_argument("--out", required=True, metavar="OUTDIR", help="where to write the files")
    iss.add_argument(
        "--ttl",
        type=_ttl,
        default=DEFAULT_TTL,
        metavar="DURATION",
        help=f"certificate lifetime, e.g. 24h, 90m, 3600s [{DEFAULT_TTL}]",
    )

    tok = ca_sub.add_parser(
        "token",
        help="print a bootstrap token",
        description="Print a bootstrap token that entitles its bearer to certificates for "
        "spiffe://<trust-domain>/ns/NS/sa/SA only.",
    )
    tok.add_argument("--dir", required=True, metavar="DIR", help="the CA directory")
    tok.add_argument("--namespace", required=True, metavar="NS")
    tok.add_argument("--service-account", required=True, metavar="SA")
    tok.add_argument(
        "--ttl",
        type=_ttl,
        default=DEFAULT_TTL,
        metavar="DURATION",
        help=f"how long the token stays valid [{DEFAULT_TTL}]",
    )
    return ca


def _init(ns: argparse.Namespace) -> str:
    from certs.ca import init_ca

    ca = init_ca(ns.dir, ns.trust_domain, intermediate=ns.intermediate, force=ns.force)
    extra = " with an intermediate CA" if ca.intermediate is not None else ""
    return f"created CA for trust domain {ca.trust_domain}{extra} in {ca.directory}"


def _issue(ns: argparse.Namespace) -> str:
    from certs.ca import issue, load_ca, write_issued

    ca = load_ca(ns.dir)
    issued = issue(ca, ns.spiffe_id, ns.ttl)
    paths = write_issued(ns.out, issued)
    names = ", ".join(str(p) for p in sorted(paths))
    return (
        f"issued {issued.spiffe_id} valid {format_duration(ns.ttl)} "
        f"(until {issued.not_after.isoformat()}): wrote {names}"
    )


def _token(ns: argparse.Namespace) -> str:
    from certs.ca import load_ca
    from certs.token import load_token_key, make_token

    ca = load_ca(ns.dir)
    key = load_token_key(ca.directory)
    return make_token(key, ca.trust_domain, ns.namespace, ns.service_account, ns.ttl)


_HANDLERS = {"init": _init, "issue": _issue, "token": _token}


def run_ca(ns: argparse.Namespace) -> int:
    """Run ``meshproxy ca <ca_command>``; returns the exit code (0 ok, 2 user mistake)."""
    try:
        line = _HANDLERS[ns.ca_command](ns)
    except CAError as e:
        print(f"meshproxy ca {ns.ca_command}: {e}", file=sys.stderr)
        return 2
    print(line, flush=True)
    return 0
