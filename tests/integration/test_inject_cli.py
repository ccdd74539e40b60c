"""``meshproxy inject`` as a user runs it: a real ``python -m meshproxy`` subprocess.

Every golden case of tests/data/inject is run through the command (from that directory, so
the file names in its stderr notes match ``NAME.notes.txt``): stdout must equal
``NAME.out.yaml`` byte for byte. Then stdin (``-f -``), ``-o OUT``, and the user mistakes that
must exit 2 with one line naming the file and document, never a traceback.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.proxyproc import REPO

DATA = REPO / "tests" / "data" / "inject"
CASES = sorted(p.name[: -len(".in.yaml")] for p in DATA.glob("*.in.yaml"))


def inject(
    *args: str, stdin: str | None = None, cwd: Path = DATA
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "inject", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def case_args(name: str) -> list[str]:
    first = (DATA / f"{name}.in.yaml").read_text().splitlines()[0]
    return shlex.split(first[len("# args:") :]) if first.startswith("# args:") else []


def assert_usage_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == f"meshproxy: error: {message}\n"


@pytest.mark.parametrize("name", CASES)
def test_golden_through_the_command(name: str) -> None:
    proc = inject("-f", f"{name}.in.yaml", *case_args(name))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (DATA / f"{name}.out.yaml").read_text()
    notes = DATA / f"{name}.notes.txt"
    assert proc.stderr == (notes.read_text() if notes.exists() else "")


def test_stdin_and_output_file(tmp_path: Path) -> None:
    text = (DATA / "multidoc-service-deployment.in.yaml").read_text()
    proc = inject("-f", "-", stdin=text)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (DATA / "multidoc-service-deployment.out.yaml").read_text()

    out = tmp_path / "injected.yaml"
    proc = inject("-f", "skip.in.yaml", "-o", str(out))
    assert (proc.returncode, proc.stdout) == (0, "")
    assert out.read_text() == (DATA / "skip.out.yaml").read_text()
    assert "not injected: hostNetwork pod" in proc.stderr
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind

    # the output feeds back in: injecting the injected file changes nothing
    proc = inject("-f", str(out))
    assert proc.returncode == 0 and proc.stdout == out.read_text()


def test_stdin_skip_notes_name_stdin() -> None:
    proc = inject("-f", "-", stdin="kind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: true\n")
    assert proc.returncode == 0
    assert proc.stderr == (
        "meshproxy inject: <stdin>: document 1 (Pod/p): not injected: hostNetwork pod\n"
    )
    assert yaml.safe_load(proc.stdout) == {
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"hostNetwork": True},
    }


def test_empty_input_gives_empty_output() -> None:
    proc = inject("-f", "-", stdin="# nothing here\n---\n")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Service\nmetadata: {name: a}\n---\nkind: Deployment\nspec: {a: [1,\n")
    out = tmp_path / "out.yaml"
    proc = inject("-f", str(bad), "-o", str(out))
    assert_usage_error(
        proc,
        f"{bad}: document 2: invalid YAML (line 6, column 1): did not find expected node content",
    )
    assert not out.exists()

    proc = inject("-f", "-", stdin="a: b\n---\n- a\n- : :\n  x\n")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("meshproxy: error: <stdin>: document 2: invalid YAML (line ")


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (
            "kind: Service\n---\n- a list\n",
            "<stdin>: document 2: expected a mapping (a Kubernetes object)",
        ),
        (
            "kind: Deployment\nmetadata: {name: web}\nspec: {replicas: 1}\n",
            "<stdin>: document 1 (Deployment/web): spec.template: missing or not a mapping",
        ),
        (
            "kind: List\nitems:\n- kind: Pod\n  metadata:\n    name: p\n    annotations:\n"
            "      sidecar.meshproxy.io/holdApplicationUntilProxyStarts: sometimes\n"
            "  spec: {containers: [{name: a}]}\n",
            "<stdin>: document 1 items[0] (Pod/p): metadata.annotations[sidecar.meshproxy.io/"
            "holdApplicationUntilProxyStarts]: expected true or false, got 'sometimes'",
        ),
    ],
)
def test_bad_documents(stdin: str, message: str) -> None:
    assert_usage_error(inject("-f", "-", stdin=stdin), message)


def test_bad_files_and_flags(tmp_path: Path) -> None:
    assert_usage_error(
        inject("-f", str(tmp_path / "nope.yaml")), f"{tmp_path}/nope.yaml: no such file"
    )
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"kind: Pod\n\xff\xfe\n")
    assert_usage_error(inject("-f", str(binary)), f"{binary}: not UTF-8 text (byte 10)")
    assert_usage_error(
        inject("-f", "pod.in.yaml", "-o", str(tmp_path / "missing" / "out.yaml")),
        f"-o {tmp_path}/missing/out.yaml: No such file or directory",
    )
    assert_usage_error(
        inject("-f", "pod.in.yaml", "-o", str(tmp_path)), f"-o {tmp_path}: is a directory"
    )
    proc = inject("-f", "pod.in.yaml", "--image-pull-policy", "Sometimes")
    assert proc.returncode == 2 and "invalid choice: 'Sometimes'" in proc.stderr
    proc = inject()
    assert (
        proc.returncode == 2
        and "the following arguments are required: -f/--filename" in proc.stderr
    )


def test_help() -> None:
    proc = inject("--help")
    assert proc.returncode == 0
    for flag in ("--filename", "--output", "--native-sidecar", "--control-plane", "--image"):
        assert flag in proc.stdout


# --------------------------------------------------------------------------- the sidecar runs


async def test_injected_sidecar_runs_as_written(tmp_path: Path) -> None:
    """The sidecar ``meshproxy inject`` writes, run as the kubelet would run it: its args with
    ``$(POD_NAME)`` / ``$(POD_NAMESPACE)`` substituted and, the test's one change, every fixed
    port replaced by an OS-chosen one on 127.0.0.1 (``--app`` by a real upstream). It connects
    to a real ``meshproxy control`` under its node id and labels, its postStart hook command
    (``meshproxy wait``) returns 0, the readiness probe path answers 200 on the health listener,
    metrics are served on the metrics listener, the inbound listener reaches the app, and
    SIGTERM stops it with exit 0."""
    import aiohttp

    from tests.integration.proxyproc import (
        Control,
        Upstream,
        kill_process,
        reviews_yaml,
        start_listening,
        wait_until,
        write_config,
    )

    app = await Upstream("app").start()
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    write_config(mesh / "reviews.yaml", reviews_yaml(app.port, app.port))
    control = Control(mesh, tmp_path / "control.log")
    sidecar = None
    try:
        await control.start()
        workload = (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n"
            "spec:\n  template:\n    metadata:\n      labels: {app: web, version: v2}\n"
            "    spec:\n      containers:\n      - name: web\n        image: web:2\n"
            "        ports: [{containerPort: 8080}]\n"
            "        readinessProbe: {httpGet: {path: /hello, port: 8080}}\n"
        )
        proc = inject("-f", "-", "--control-plane", control.url, stdin=workload)
        assert proc.returncode == 0, proc.stderr
        pod = yaml.safe_load(proc.stdout)["spec"]["template"]
        container = pod["spec"]["containers"][0]
        env = {"$(POD_NAME)": "web-7d4b9c-x2x9q", "$(POD_NAMESPACE)": "shop"}
        fixed = {
            "127.0.0.1:15001": "127.0.0.1:0",
            "0.0.0.0:15006": "127.0.0.1:0",
            "127.0.0.1:15000": "127.0.0.1:0",
            "0.0.0.0:15021": "127.0.0.1:0",
            "0.0.0.0:15090": "127.0.0.1:0",
            "127.0.0.1:8080": f"127.0.0.1:{app.port}",
        }
        args = []
        for a in container["args"]:
            for var, value in env.items():
                a = a.replace(var, value)
            args.append(fixed.get(a, a).replace('"port":8080', f'"port":{app.port}'))
        assert sum(a != b for a, b in zip(args, container["args"], strict=True)) == 9
        sidecar, fields = await start_listening(args, tmp_path / "sidecar.log", "sidecar")
        assert set(fields) == {"outbound", "inbound", "admin", "health", "metrics"}

        hook = container["lifecycle"]["postStart"]["exec"]["command"]
        at = hook.index("--url") + 1
        assert hook[0] == "meshproxy" and hook[at] == "http://127.0.0.1:15021/healthz/ready"
        cmd = [*hook[1:at], f"http://{fields['health']}/healthz/ready", *hook[at + 1 :]]
        waited = subprocess.run(
            [sys.executable, "-m", "meshproxy", *cmd], capture_output=True, text=True, timeout=90
        )
        assert waited.returncode == 0, waited.stderr

        probe = container["readinessProbe"]["httpGet"]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{fields['health']}{probe['path']}") as r:
                assert r.status == 200
            # the app's own probe, rewritten by the injector, performed by the sidecar
            app_probe = pod["spec"]["containers"][1]["readinessProbe"]["httpGet"]
            assert app_probe["path"] == "/app-health/web/readyz" and app_probe["port"] == 15021
            async with s.get(f"http://{fields['health']}{app_probe['path']}") as r:
                assert r.status == 200
            async with s.get(f"http://{fields['metrics']}/stats/prometheus") as r:
                assert r.status == 200 and "meshproxy_" in await r.text()
            async with s.get(f"http://{fields['inbound']}/hello") as r:
                assert r.status == 200
                assert (await r.json())["name"] == "app"

        async def synced() -> bool:
            for p in (await control.status())["proxies"]:
                if p["node_id"] == "web-7d4b9c-x2x9q.shop" and p["status"] == "SYNCED":
                    return True
            return False

        await wait_until(synced, timeout=15)
        (status,) = [
            p for p in (await control.status())["proxies"] if p["node_id"].endswith(".shop")
        ]
        assert status["namespace"] == "shop"
        assert status["labels"]["app"] == "web" and status["labels"]["version"] == "v2"
        assert status["labels"]["service.meshproxy.io/canonical-name"] == "web"

        sidecar.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sidecar.wait(), 30) == 0
    finally:
        await kill_process(sidecar)
        await control.kill()
        await app.close()
