"""The container image, checked without a Docker engine.

CI has no engine, so ``docker build`` cannot run. These tests read the
Dockerfile and .dockerignore with a small parser and check what an image
build depends on:

- the build context: every path the Dockerfile copies exists and survives
  .dockerignore (matched with Docker's rules: last matching line wins, a
  pattern matching a directory covers everything below it), and what must
  stay out of the context does;
- the final stage: a fixed non-root user, no compilers or test tools, only
  config copied from the context, volumes owned by that user, the command
  pointing at the config the image ships, and no port exposed that the
  config binds to loopback;
- the install: the builder's two wheels are built from a copy of exactly
  what the builder stage copies, the final stage's install command runs as
  written (image paths moved to temp dirs) into a fresh venv, and the
  installed command runs from outside the repository: ``--help``, ``check``
  and the image's own ``run`` command, stopped with its stop signal.

The install tests work offline: instead of the dependency wheels the builder
stage downloads, they repack as wheels the installed distributions that our
wheels declare (following ``Requires-Dist``). The venv then holds what the
image holds and no more, so an import the wheels do not declare, or one of
pip or setuptools, fails here as it would in the image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import posixpath
import re
import shutil
import signal
import stat
import subprocess
import sys
import zipfile

import pytest
import yaml
from packaging.requirements import Requirement
from support import REPO_ROOT, wait_serving

from kynara_sidecar.config import load_config

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
# Our own distributions: built from the context, never taken from this venv.
OWN_DISTRIBUTIONS = {"kynara-protos", "kynara-sidecar"}
# Files a checkout may hold under a copied directory that the context rightly
# leaves out: bytecode and setuptools leftovers.
BUILD_LEFTOVER = re.compile(r"(^|/)(__pycache__|[^/]+\.egg-info|build)(/|$)|\.py[cod]$")
# Packages that may only ever be in the builder stage or a developer's venv.
BUILD_AND_TEST_TOOLS = (
    "build-essential", "gcc", "g++", "clang", "make", "cmake", "python3-dev",
    "pytest", "hypothesis", "ruff", "grpcio-tools", "atheris",
)  # fmt: skip
# Written by the installer, not part of a wheel.
INSTALLER_FILES = {"INSTALLER", "REQUESTED", "direct_url.json"}
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Installing into a fresh venv runs pip twice and starts the daemon: a few
# seconds each on a small CI runner.
INSTALL_TIMEOUT = 180.0
START_TIMEOUT = 30.0
# What a container process starts with unless the image or runtime sets one.
DOCKER_UMASK = 0o022


# --- parsing the Dockerfile --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name!r} has no {keyword}"
        return found[-1]


@dataclasses.dataclass(frozen=True)
class Copy:
    stage: str
    sources: tuple[str, ...]
    dest: str
    flags: dict[str, str]
    line: int

    @property
    def from_context(self) -> bool:
        return "from" not in self.flags


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations; drop comments (and # syntax= directives)."""
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append((start, pending + stripped))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return lines


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: args.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions; FROM sees global ARGs."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = _substitute(args, global_args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(name or str(len(stages)), words[0], []))
        else:
            assert stages, f"line {number}: {keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, args, number))
    return stages


def _split_flags(args: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        key, _, value = flag[2:].partition("=")
        flags[key] = value
        args = args.strip()
    return flags, args


def _json_or_words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else args.split()


def copies(stages: list[Stage]) -> list[Copy]:
    """Every COPY and ADD, with its sources, destination and flags."""
    found = []
    for stage in stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, rest = _split_flags(instruction.args)
            *sources, dest = _json_or_words(rest)
            found.append(
                Copy(stage.name, tuple(sources), dest, flags, instruction.line)
            )
    return found


def exec_form(instruction: Instruction) -> list[str]:
    """ENTRYPOINT / CMD in exec (JSON) form; the shell form would wrap signals."""
    assert instruction.args.startswith("["), (
        f"line {instruction.line}: {instruction.keyword} should be in JSON form "
        "so the daemon is PID 1 and receives SIGTERM itself"
    )
    return json.loads(instruction.args)


# --- .dockerignore, with Docker's matching rules -----------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Translate a .dockerignore pattern as Docker's patternmatcher does."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out)


class DockerIgnore:
    """The exclusions of a .dockerignore file.

    Each line is cleaned like a path; the last line that matches a path or one
    of its parent directories decides, and ``!`` lines re-include.
    """

    def __init__(self, text: str):
        self._rules: list[tuple[bool, re.Pattern[str]]] = []
        self._includes: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
            self._rules.append((include, _pattern_regex(pattern)))
            if include:
                self._includes.append(pattern)

    def excludes(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for include, regex in self._rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                excluded = not include
        return excluded

    def may_include_below(self, directory: str) -> bool:
        """Whether a ``!`` line could bring back something inside directory."""
        return any(
            pattern.startswith(directory + "/") or re.search(r"[*?\[]", pattern)
            for pattern in self._includes
        )


def repo_files(root: pathlib.Path) -> list[str]:
    """Every file below root as a posix path relative to it, .git left out."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [
            d for d in subdirs if not (directory == str(root) and d == ".git")
        ]
        base = pathlib.Path(directory).relative_to(root)
        found += [(base / name).as_posix() for name in files]
    return found


def stage_context(root: pathlib.Path, ignore: DockerIgnore, dest: pathlib.Path):
    """Copy what `docker build` would send as its context."""
    for directory, subdirs, files in os.walk(root):
        base = pathlib.Path(directory).relative_to(root)
        # Not descending into .venv, .git and the like keeps this quick.
        subdirs[:] = [
            d
            for d in subdirs
            if not ignore.excludes((base / d).as_posix())
            or ignore.may_include_below((base / d).as_posix())
        ]
        for name in files:
            relative = (base / name).as_posix()
            if not ignore.excludes(relative):
                (dest / base).mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / relative, dest / relative)


def workdir_at(stage: Stage, line: int) -> str:
    """The working directory an instruction on that line runs in."""
    workdir = "/"
    for instruction in stage.all("WORKDIR"):
        if instruction.line < line:
            workdir = posixpath.join(workdir, instruction.args)
    return workdir


def apply_copy(copy: Copy, stage: Stage, context: pathlib.Path, root: pathlib.Path):
    """Do one COPY from a staged context into a staged filesystem under root."""
    dest = posixpath.join(workdir_at(stage, copy.line), copy.dest)
    for source in copy.sources:
        origin = context / source.rstrip("/")
        assert origin.exists(), f"COPY {source}: not in the build context"
        if origin.is_dir():
            shutil.copytree(origin, root / dest.lstrip("/"), dirs_exist_ok=True)
        else:
            target = root / dest.lstrip("/")
            if copy.dest.endswith("/") or len(copy.sources) > 1:
                target = target / origin.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


STAGES = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
BUILDER, RUNTIME = STAGES[0], STAGES[-1]
IGNORE = DockerIgnore(DOCKERIGNORE.read_text(encoding="utf-8"))
CONTEXT_COPIES = [c for c in copies(STAGES) if c.from_context]
CONTEXT_SOURCES = [(c, s) for c in CONTEXT_COPIES for s in c.sources]
SOURCE_IDS = [f"{c.stage}:{s}" for c, s in CONTEXT_SOURCES]


def _user() -> tuple[str, str]:
    uid, _, gid = RUNTIME.last("USER").args.partition(":")
    return uid, gid


def _copied_to(source: str) -> str:
    """Where the final stage copies a context path to."""
    for copy in CONTEXT_COPIES:
        if copy.stage == RUNTIME.name and source in copy.sources:
            return copy.dest
    raise AssertionError(f"the final stage does not COPY {source}")


def _image_config() -> tuple[str, dict]:
    command = exec_form(RUNTIME.last("CMD"))
    path = command[command.index("--config") + 1]
    source = next(s for c in CONTEXT_COPIES for s in c.sources if c.dest == path)
    return path, yaml.safe_load((REPO_ROOT / source).read_text(encoding="utf-8"))


def _volumes() -> list[str]:
    return [v for i in RUNTIME.all("VOLUME") for v in _json_or_words(i.args)]


# --- the Dockerfile and its context ------------------------------------------


def test_dockerignore_matches_like_docker():
    ignore = DockerIgnore("*\n!src/\n**/__pycache__\n!src/keep/__pycache__\n")

    assert not ignore.may_include_below(".git")
    assert ignore.may_include_below("src")
    assert ignore.excludes("README.md")
    assert ignore.excludes("other/file.py")
    assert not ignore.excludes("src/a/b.py")
    assert ignore.excludes("src/a/__pycache__/b.pyc")
    assert not ignore.excludes("src/keep/__pycache__/b.pyc")


def test_builder_and_runtime_share_one_slim_python_base():
    assert [s.name for s in STAGES] == ["builder", "runtime"]
    assert BUILDER.base == RUNTIME.base
    assert re.fullmatch(
        r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", RUNTIME.base
    )


@pytest.mark.parametrize(("copy", "source"), CONTEXT_SOURCES, ids=SOURCE_IDS)
def test_every_copied_path_exists_in_the_repo(copy, source):
    assert (REPO_ROOT / source).exists(), f"Dockerfile line {copy.line}: {source}"


@pytest.mark.parametrize(("copy", "source"), CONTEXT_SOURCES, ids=SOURCE_IDS)
def test_every_copied_path_is_in_the_build_context(copy, source):
    path = REPO_ROOT / source
    files = (
        [f"{source.rstrip('/')}/{f}" for f in repo_files(path)]
        if path.is_dir()
        else [source]
    )

    left_out = [f for f in files if IGNORE.excludes(f) and not BUILD_LEFTOVER.search(f)]

    assert files
    assert left_out == [], f"Dockerfile line {copy.line}: .dockerignore drops these"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".venvs/old/bin/python",
        "tests/test_cli.py",
        "var/audit/data.mdb",
        "var/run/agent.sock",
        "node_modules/pkg/index.js",
        "benchmarks/bench_decide.py",
        "clients/python/pyproject.toml",
        ".pytest_cache/v/cache/nodeids",
        ".hypothesis/examples/x",
        ".ruff_cache/CACHEDIR.TAG",
        "kynara_sidecar/__pycache__/cli.cpython-311.pyc",
        "kynara_sidecar.egg-info/PKG-INFO",
        "protos/python/kynara_protos.egg-info/PKG-INFO",
        "build/lib/kynara_sidecar/cli.py",
        ".env",
    ],
)
def test_build_context_leaves_out(path):
    assert IGNORE.excludes(path)


def test_image_runs_as_a_fixed_non_root_user():
    uid, gid = _user()
    creates_user = " ".join(i.args for i in RUNTIME.all("RUN"))

    assert uid.isdigit() and int(uid) != 0, "USER must be numeric for runAsNonRoot"
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    assert f"--uid {uid}" in creates_user


def test_final_stage_has_no_compilers_or_test_tools():
    commands = " ".join(i.args for i in RUNTIME.all("RUN"))
    runtime_copies = [c for c in CONTEXT_COPIES if c.stage == RUNTIME.name]

    present = [tool for tool in BUILD_AND_TEST_TOOLS if tool in commands.split()]
    assert present == []
    assert "[test]" not in commands
    assert all(s.startswith("config/") for c in runtime_copies for s in c.sources)


def test_runtime_installs_only_the_builder_wheels():
    (install,) = [i.args for i in RUNTIME.all("RUN") if "pip install" in i.args]
    wheels = " ".join(i.args for i in BUILDER.all("RUN") if "pip wheel" in i.args)

    assert "--no-index" in install
    assert "from=builder" in install
    assert "./protos ." in wheels
    assert "[test]" not in wheels


def test_entrypoint_runs_the_daemon_on_the_shipped_config():
    assert exec_form(RUNTIME.last("ENTRYPOINT")) == ["kynara-sidecar"]
    assert exec_form(RUNTIME.last("CMD")) == [
        "run", "--config", "/etc/kynara/kynara.yaml",
    ]  # fmt: skip
    assert RUNTIME.last("STOPSIGNAL").args == "SIGTERM"


def test_image_config_names_the_paths_the_image_provides():
    path, config = _image_config()
    volumes = _volumes()

    assert _copied_to("config/docker.yaml") == path
    assert config["policy"]["source"].rstrip("/") == _copied_to(
        "config/policies/"
    ).rstrip("/")
    for key in ("path", "signing_key", "witness_path"):
        assert any(config["audit"][key].startswith(v + "/") for v in volumes), key
    assert posixpath.dirname(config["agent"]["socket"]) in volumes


def test_image_config_is_valid():
    config = load_config(REPO_ROOT / "config" / "docker.yaml")

    assert config.identity.daemon_id == "", "each container names itself"
    assert pathlib.PurePosixPath(config.audit.path).is_absolute()


def test_exposes_no_port_the_config_binds_to_loopback():
    _, config = _image_config()
    exposed = [p.split("/")[0] for i in RUNTIME.all("EXPOSE") for p in i.args.split()]
    loopback = {
        str(section["port"])
        for section in (config["agent"], config["http"], config["health"])
        if section["host"] in LOOPBACK
    }

    assert loopback.isdisjoint(exposed)


def test_volumes_are_created_for_the_image_user_before_declared():
    uid, _ = _user()
    (volume,) = RUNTIME.all("VOLUME")
    earlier = [
        i.args
        for i in RUNTIME.all("RUN")
        if i.line < volume.line and f"-o {uid}" in i.args
    ]

    for path in _volumes():
        assert any(re.search(rf"{re.escape(path)}(\s|$)", run) for run in earlier), path


# --- the install, offline ----------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would find the repo's sources."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **extra}


def _run(args, cwd, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env or _clean_env(),
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def _declared(wheel: pathlib.Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    return [Requirement(line.split(":", 1)[1]) for line in metadata.splitlines()
            if line.startswith("Requires-Dist:")]  # fmt: skip


def _runtime_distributions(wheels: list[pathlib.Path]):
    """Installed distributions the wheels need, following Requires-Dist."""
    pending = [(req, "") for wheel in wheels for req in _declared(wheel)]
    needed: dict[str, importlib.metadata.Distribution] = {}
    while pending:
        req, extra = pending.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        if name in OWN_DISTRIBUTIONS or name in needed:
            continue
        dist = importlib.metadata.distribution(name)
        assert req.specifier.contains(dist.version, prereleases=True), (req, dist)
        needed[name] = dist
        for sub in dist.requires or []:
            pending += [(Requirement(sub), e) for e in ("", *req.extras)]
    return list(needed.values())


def _repack(dist: importlib.metadata.Distribution, wheels: pathlib.Path) -> None:
    """Stand-in for a wheel the builder downloads: an installed distribution."""
    files = [f for f in dist.files or [] if f.parts[0] != ".."]
    (info,) = {f.parts[0] for f in files if f.parts[0].endswith(".dist-info")}
    wheel_file = dist.read_text("WHEEL") or ""
    tag = next(line.split(":", 1)[1].strip() for line in wheel_file.splitlines()
               if line.startswith("Tag:"))  # fmt: skip
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = wheels / f"{name}-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for file in files:
            installer_only = file.parts[0] == info and file.name in INSTALLER_FILES
            if "__pycache__" not in file.parts and not installer_only:
                archive.write(dist.locate_file(file), file.as_posix())


def _runtime_install_command(venv: pathlib.Path, wheels: pathlib.Path) -> str:
    """The final stage's install RUN, with its image paths moved to temp dirs."""
    (run,) = [i for i in RUNTIME.all("RUN") if "pip install" in i.args]
    flags, command = _split_flags(run.args)
    mount = dict(part.partition("=")[::2] for part in flags["mount"].split(","))
    venv_dir = re.search(r"-m venv (\S+)", command).group(1)
    command = re.sub(rf"{re.escape(venv_dir)}(?=[/\s]|$)", str(venv), command)
    return re.sub(rf"{re.escape(mount['target'])}(?=[/\s]|$)", str(wheels), command)


@dataclasses.dataclass(frozen=True)
class InstalledImage:
    """The runtime stage, rebuilt in a temp dir: a venv and the image's files."""

    built: tuple[str, ...]  # file names of the wheels built from the context
    venv: pathlib.Path
    root: pathlib.Path  # what the final stage copied, under its absolute paths
    outside: pathlib.Path  # a working directory outside the repository

    def command(self, name: str) -> pathlib.Path:
        return self.venv / "bin" / name


@pytest.fixture(scope="module")
def installed_image(tmp_path_factory) -> InstalledImage:
    base = tmp_path_factory.mktemp("image")
    context, builder, wheels = base / "context", base / "builder", base / "wheels"
    stage_context(REPO_ROOT, IGNORE, context)
    for copy in CONTEXT_COPIES:
        if copy.stage == BUILDER.name:
            apply_copy(copy, BUILDER, context, builder)
    (wheel_run,) = [i for i in BUILDER.all("RUN") if "pip wheel" in i.args]
    source = builder / workdir_at(BUILDER, wheel_run.line).lstrip("/")
    # The builder's `pip wheel ./protos .`, without fetching dependencies or
    # build tools: --no-build-isolation builds with this venv's setuptools.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--wheel-dir", wheels, "./protos", "."], cwd=source)  # fmt: skip
    built = sorted(wheels.glob("*.whl"))

    for dist in _runtime_distributions(built):
        _repack(dist, wheels)
    venv = base / "venv"
    # `python` is this interpreter, as it is the base image's in the stage.
    path = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    _run(["sh", "-ec", _runtime_install_command(venv, wheels)], cwd=base,
         env=_clean_env(PATH=path))  # fmt: skip

    root = base / "root"
    for copy in CONTEXT_COPIES:
        if copy.stage == RUNTIME.name:
            apply_copy(copy, RUNTIME, context, root)
    outside = base / "work"
    outside.mkdir()
    return InstalledImage(tuple(p.name for p in built), venv, root, outside)


@pytest.mark.slow
def test_builder_wheels_are_our_two_distributions(installed_image):
    names = sorted(name.split("-")[0] for name in installed_image.built)

    assert names == ["kynara_protos", "kynara_sidecar"]


@pytest.mark.slow
def test_installed_command_prints_help_outside_the_repo(installed_image):
    result = _run([installed_image.command("kynara-sidecar"), "--help"],
                  cwd=installed_image.outside)  # fmt: skip

    assert "kynara-sidecar" in result.stdout
    assert "check" in result.stdout


@pytest.mark.slow
def test_installed_command_checks_the_policies(installed_image):
    result = _run(
        [installed_image.command("kynara-sidecar"), "check",
         REPO_ROOT / "config" / "policies"],
        cwd=installed_image.outside,
    )  # fmt: skip

    assert result.stdout.startswith("ok: policy sha256:")


@pytest.mark.slow
def test_installed_code_comes_from_the_wheels_not_the_repo(installed_image):
    probe = (
        "import kynara_sidecar.cli, kynara.v1.decision_pb2 as d; "
        "print(kynara_sidecar.cli.__file__); print(d.__file__)"
    )

    result = _run([installed_image.command("python"), "-c", probe],
                  cwd=installed_image.outside)  # fmt: skip

    for location in result.stdout.split():
        assert pathlib.Path(location).is_relative_to(installed_image.venv)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["pip", "setuptools", "pytest", "hypothesis"])
def test_image_venv_holds_no_build_or_test_tools(installed_image, module):
    result = subprocess.run(
        [installed_image.command("python"), "-c", f"import {module}"],
        cwd=installed_image.outside, env=_clean_env(), capture_output=True,
        text=True, timeout=INSTALL_TIMEOUT,
    )  # fmt: skip

    assert result.returncode != 0
    assert f"No module named {module!r}" in result.stderr


@dataclasses.dataclass
class ImageDaemon:
    process: subprocess.Popen
    socket: pathlib.Path
    audit: pathlib.Path
    log: pathlib.Path


@contextlib.contextmanager
def image_daemon(image: InstalledImage, tmp_path: pathlib.Path):
    """The image's entrypoint and command, serving; killed if still running.

    The absolute image paths move under temp dirs and ports are left to the
    kernel. The umask is Docker's default.
    """
    config_path, config = _image_config()
    socket = tmp_path / "run" / "agent.sock"
    audit = tmp_path / "lib" / "audit"
    entrypoint = exec_form(RUNTIME.last("ENTRYPOINT"))
    command = exec_form(RUNTIME.last("CMD"))
    args = [
        image.command(entrypoint[0]), *entrypoint[1:],
        *[image.root / a.lstrip("/") if a == config_path else a for a in command],
        "--set", f"policy.source={image.root / config['policy']['source'][1:]}",
        "--set", f"agent.socket={socket}", "--set", f"audit.path={audit}",
        "--set", f"agent.fast_socket={socket.parent / 'agent.fast.sock'}",
        "--set", f"audit.signing_key={audit.parent / 'keys' / 'audit.pem'}",
        "--set", f"audit.witness_path={audit.parent / 'witness'}",
        "--set", "agent.port=0", "--set", "health.port=0", "--set", "http.port=0",
    ]  # fmt: skip
    log = tmp_path / "daemon.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [str(a) for a in args], cwd=image.outside, env=_clean_env(),
            stderr=log_file, umask=DOCKER_UMASK,
        )  # fmt: skip
        try:
            wait_serving(f"unix://{socket}", process, log)
            yield ImageDaemon(process, socket, audit, log)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_image_command_serves_and_stops_on_its_stop_signal(installed_image, tmp_path):
    _, config = _image_config()
    stop_signal = getattr(signal, RUNTIME.last("STOPSIGNAL").args)

    with image_daemon(installed_image, tmp_path) as daemon:
        daemon.process.send_signal(stop_signal)
        exit_code = daemon.process.wait(timeout=config["shutdown_grace_seconds"] + 20)
    lib = daemon.audit.parent
    verified = _run(
        [
            installed_image.command("kynara-sidecar"), "verify", "--audit",
            daemon.audit, "--trusted-key", lib / "keys" / "audit.pub",
            "--witness", lib / "witness",
        ],
        cwd=installed_image.outside,
    )  # fmt: skip

    assert exit_code == 0, daemon.log.read_text()
    assert verified.stdout.startswith("ok")


@pytest.mark.slow
def test_agent_socket_is_connectable_by_the_pod_group(installed_image, tmp_path):
    with image_daemon(installed_image, tmp_path) as daemon:
        mode = daemon.socket.stat().st_mode

    assert mode & stat.S_IWGRP, f"socket mode {stat.filemode(mode)}"
