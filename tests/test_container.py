"""The container files: Dockerfile, .dockerignore, docker-compose.yml.

There is no Docker engine here, so the image is never built. What can be checked is:
the compose file is valid (``docker-compose config``, skipped only when that binary is missing),
every ``${VAR}`` it uses is documented in .env.example, the files have the shape the image needs
(exec-form CMD, non-root, state under the /data volume, health checks), and the image's command
with the image's environment serves from a wheel built from the files the Dockerfile copies out
of the build context that .dockerignore leaves.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.server import free_port
from tests.support.waiting import wait_for_sync

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

APT_HINT = "apt-get update && apt-get install -y docker-compose"
NOTIFIER_SERVICES = ("notifier", "notifier-2")


# --- reading the files ---------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str
    stage: int


@dataclass
class Dockerfile:
    instructions: list[Instruction] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path = DOCKERFILE) -> Dockerfile:
        """Instructions with continuation lines joined and comments dropped, by stage."""
        parsed = cls()
        stage = -1
        pending = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            pending += line[:-1] + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            keyword, _, arguments = pending.partition(" ")
            pending = ""
            if keyword.upper() == "FROM":
                stage += 1
            parsed.instructions.append(Instruction(keyword.upper(), arguments.strip(), stage))
        return parsed

    @property
    def final_stage(self) -> int:
        return max(i.stage for i in self.instructions)

    def all(self, keyword: str, *, stage: int | None = None) -> list[str]:
        return [
            i.arguments
            for i in self.instructions
            if i.keyword == keyword and (stage is None or i.stage == stage)
        ]

    def last(self, keyword: str) -> str:
        found = self.all(keyword, stage=self.final_stage)
        assert found, f"the runtime stage has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """The runtime stage's ENV, KEY=VALUE form only (the legacy `ENV KEY VALUE` is refused)."""
        values: dict[str, str] = {}
        for arguments in self.all("ENV", stage=self.final_stage):
            for token in shlex.split(arguments):
                key, equals, value = token.partition("=")
                assert equals, f"ENV {arguments!r}: use the KEY=VALUE form"
                values[key] = value
        return values

    def exec_form(self, arguments: str) -> list[str]:
        command = json.loads(arguments)
        assert isinstance(command, list), f"{arguments!r} is not the exec (JSON array) form"
        assert all(isinstance(part, str) for part in command)
        return command

    def cmd(self) -> list[str]:
        return self.exec_form(self.last("CMD"))

    def healthcheck(self) -> list[str]:
        _options, separator, command = self.last("HEALTHCHECK").partition("CMD ")
        assert separator, "HEALTHCHECK has no CMD"
        return self.exec_form(command)

    def volumes(self) -> list[str]:
        volumes: list[str] = []
        for arguments in self.all("VOLUME", stage=self.final_stage):
            volumes += json.loads(arguments) if arguments.startswith("[") else arguments.split()
        return volumes

    def build_stage_copies(self) -> list[str]:
        """Sources of the first stage's COPY from the build context (not --from another stage)."""
        sources: list[str] = []
        for arguments in self.all("COPY", stage=0):
            parts = [p for p in shlex.split(arguments) if not p.startswith("--")]
            assert "--from" not in arguments, "the build stage copies from the context only"
            sources += parts[:-1]
        return sources


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(negated, pattern) pairs of .dockerignore, in order."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):
        tail = pattern[3:]
        parts = path.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[i:]), tail) for i in range(len(parts)))
    return fnmatch.fnmatchcase(path, pattern)


def dockerignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether Docker leaves ``path`` (relative, with /) out of the context: the last pattern
    that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, pattern in patterns:
        if any(_matches(pattern, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def build_context(destination: Path) -> Path:
    """Copy of the repository as `docker build .` would send it, after .dockerignore."""
    patterns = dockerignore_patterns()
    for folder, subfolders, files in os.walk(ROOT):
        relative = Path(folder).relative_to(ROOT)
        subfolders[:] = [
            d for d in subfolders if not dockerignored((relative / d).as_posix(), patterns)
        ]
        for name in files:
            if not dockerignored((relative / name).as_posix(), patterns):
                target = destination / relative / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with suppress(FileNotFoundError):  # a file someone's tool just removed
                    shutil.copy2(Path(folder) / name, target)
    return destination


def compose_file() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return document


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


# `$$` is a literal dollar sign; `${NAME...}` and `$NAME` are interpolated.
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def compose_variables() -> set[str]:
    names = set()
    for text in _strings(compose_file()):
        for braced, bare in INTERPOLATION.findall(text):
            if braced or bare:
                names.add(braced or bare)
    return names


def env_example_names() -> list[str]:
    names = []
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            names.append(line.partition("=")[0].strip())
    return names


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


# --- docker-compose config ----------------------------------------------------------------


def docker_compose(context: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(f"the docker-compose binary is not installed ({APT_HINT})")
    # Only the .env in the context may supply the compose variables.
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in compose_variables() and not k.startswith("COMPOSE_")
    }
    return subprocess.run(
        [binary, "--project-directory", str(context), "-f", "docker-compose.yml", *arguments],
        cwd=context,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def compose_context(tmp_path: Path) -> Path:
    """The compose file beside its Dockerfile, with .env copied from .env.example."""
    for path in (COMPOSE, DOCKERFILE, DOCKERIGNORE):
        shutil.copy2(path, tmp_path / path.name)
    shutil.copy2(ENV_EXAMPLE, tmp_path / ".env")
    return tmp_path


@pytest.mark.parametrize("profile", [(), ("--profile", "replicas")], ids=["default", "replicas"])
def test_compose_file_is_valid(compose_context: Path, profile: tuple[str, ...]) -> None:
    result = docker_compose(compose_context, *profile, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no warning either (an unset variable, ...)


def test_compose_config_resolves_the_database_url_from_env(compose_context: Path) -> None:
    with (compose_context / ".env").open("a", encoding="utf-8") as env:
        env.write("POSTGRES_PASSWORD=s3cret-from-env\n")
    result = docker_compose(compose_context, "--profile", "replicas", "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in NOTIFIER_SERVICES:
        url = services[name]["environment"]["NOTIFIER_DATABASE_URL"]
        assert url == "postgresql://notifier:s3cret-from-env@postgres:5432/notifier"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret-from-env"


def test_compose_config_refuses_a_missing_postgres_password(compose_context: Path) -> None:
    env = compose_context / ".env"
    lines = env.read_text(encoding="utf-8").splitlines()
    env.write_text(
        "".join(f"{line}\n" for line in lines if not line.startswith("POSTGRES_PASSWORD=")),
        encoding="utf-8",
    )
    result = docker_compose(compose_context, "config", "-q")
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


# --- the compose file and .env.example, without docker-compose --------------------------------


def test_every_compose_variable_is_in_env_example() -> None:
    used = compose_variables()
    assert "POSTGRES_PASSWORD" in used  # the extraction itself works
    missing = sorted(used - set(env_example_names()))
    assert not missing, f"add to .env.example (docker compose only section): {missing}"


def test_env_example_has_no_unused_compose_variable() -> None:
    """Names in .env.example that are not settings (NOTIFIER_*) exist for the compose file."""
    names = env_example_names()
    assert len(names) == len(set(names)), "a name is listed twice in .env.example"
    stale = sorted({n for n in names if not n.startswith("NOTIFIER_")} - compose_variables())
    assert not stale, f"not used by docker-compose.yml: {stale}"


def test_compose_notifier_services_share_postgres_and_send_to_mailpit() -> None:
    services = compose_file()["services"]
    urls = set()
    for name in NOTIFIER_SERVICES:
        service = services[name]
        assert service["build"] == "."
        assert ".env" in (
            [service["env_file"]] if isinstance(service["env_file"], str) else service["env_file"]
        )
        environment = environment_of(service)
        # Fixed here, so the host defaults in a .env copied from .env.example cannot win.
        assert environment["NOTIFIER_HOST"] == "0.0.0.0"
        assert environment["NOTIFIER_SMTP_HOST"] == "mailpit"
        assert environment["NOTIFIER_SMTP_PORT"] == "1025"
        assert environment["NOTIFIER_SMTP_SECURITY"] == "none"
        assert environment["NOTIFIER_OUTBOX_DIR"].startswith("/data/")
        assert any(str(v).endswith(":/data") for v in service["volumes"])
        urls.add(environment["NOTIFIER_DATABASE_URL"])
        assert service["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "mailpit": {"condition": "service_healthy"},
        }
        assert "healthcheck" not in service, "the image's HEALTHCHECK is the one to use"
    assert len(urls) == 1 and urls.pop().startswith("postgresql://notifier:")
    assert services["notifier-2"]["profiles"] == ["replicas"]


def test_compose_publishes_distinct_host_ports_on_loopback_by_default() -> None:
    services = compose_file()["services"]
    published = [p for s in services.values() for p in s.get("ports", [])]
    host_ports = [p.rsplit(":", 1)[0] for p in published]
    assert len(host_ports) == len(set(host_ports)), published
    assert all(p.startswith("${PUBLISH_ADDRESS:-127.0.0.1}:") for p in published), published
    assert "ports" not in services["postgres"]


def test_compose_services_have_health_checks_and_named_volumes() -> None:
    document = compose_file()
    services = document["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["mailpit"]["image"].startswith("axllent/mailpit")
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["mailpit"]["healthcheck"]["test"] == ["CMD", "/mailpit", "readyz"]
    named = set(document["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name}: volume {source!r} is not declared"


# --- Dockerfile and .dockerignore ---------------------------------------------------------


def test_dockerfile_is_multi_stage_with_a_slim_python_311_runtime() -> None:
    dockerfile = Dockerfile.read()
    assert dockerfile.final_stage >= 1
    arguments = dict(a.partition("=")[::2] for a in dockerfile.all("ARG", stage=-1))
    base = dockerfile.last("FROM").split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], base)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    assert any("pip wheel" in run for run in dockerfile.all("RUN", stage=0))
    runtime_runs = " ".join(dockerfile.all("RUN", stage=dockerfile.final_stage))
    for tool in ("apt-get", "gcc", "build-essential", "curl", "wget"):
        assert tool not in runtime_runs, f"the runtime stage installs {tool}"


def test_dockerfile_runs_serve_as_a_non_root_user_in_exec_form() -> None:
    dockerfile = Dockerfile.read()
    assert dockerfile.cmd() == ["notifier", "serve"]
    assert not dockerfile.all("ENTRYPOINT", stage=dockerfile.final_stage)
    user = dockerfile.last("USER").split(":")[0]
    assert user not in ("root", "0"), user
    assert sorted(" ".join(dockerfile.all("EXPOSE")).split()) == ["7725", "7726"]


def test_dockerfile_keeps_state_under_the_data_volume() -> None:
    dockerfile = Dockerfile.read()
    env = dockerfile.env()
    assert env["NOTIFIER_HOST"] == "0.0.0.0"
    assert (env["NOTIFIER_PORT"], env["NOTIFIER_HTTP_PORT"]) == ("7725", "7726")
    assert dockerfile.volumes() == ["/data"]
    assert env["NOTIFIER_DATABASE_URL"] == "sqlite:////data/notifier.db"
    assert env["NOTIFIER_OUTBOX_DIR"] == "/data/outbox"
    assert env["NOTIFIER_TEMPLATES_DIR"] == "/app/templates"
    assert dockerfile.last("WORKDIR") == "/data"


def test_dockerfile_healthcheck_needs_no_curl() -> None:
    command = Dockerfile.read().healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2] and "urllib.request" in command[2]


def test_dockerignore_keeps_secrets_and_local_state_out_but_the_sources_in() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".env",
        ".env.production",
        ".git/config",
        ".venv/bin/python",
        "notifier/__pycache__/server.cpython-311.pyc",
        "notifier.db",
        "notifier.db-wal",
        "outbox/email/x.eml",
        ".pytest_cache/v/cache",
        "notifier.egg-info/PKG-INFO",
    ):
        assert dockerignored(path, patterns), f"{path} would be sent to the builder"
    for source in Dockerfile.read().build_stage_copies():
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert not dockerignored("notifier/server.py", patterns)


# --- the image's command, from a wheel install ----------------------------------------------


@dataclass
class Installed:
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def _run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """notifier installed from a wheel into a fresh venv, as the image's runtime stage does.

    The wheel is built from exactly what the Dockerfile's build stage copies out of the
    .dockerignore'd context. Differences from the image, for speed and to work offline: the
    wheel is built without build isolation, and the dependencies are not installed but taken
    from this interpreter's site-packages through a .pth file (which does not bring this
    checkout's editable install along: .pth files are processed only in site folders).
    """
    root = tmp_path_factory.mktemp("image")
    context = build_context(root / "context")
    source = root / "src"
    for copied in Dockerfile.read().build_stage_copies():
        origin = context / copied
        assert origin.exists(), f"COPY {copied}: not in the build context"
        if origin.is_dir():
            shutil.copytree(origin, source / copied)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(origin, source / copied)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(*pip, "wheel", "--no-deps", "-w", wheels, source, cwd=root)
    (wheel,) = wheels.glob("notifier-*.whl")
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(*pip, "--python", python, "install", "--no-deps", "--no-index", wheel)
    site_packages = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    dependencies = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(site_packages.strip(), "_dependencies.pth").write_text(
        "".join(f"{path}\n" for path in sorted(dependencies)), encoding="utf-8"
    )
    return Installed(venv)


@dataclass
class ImageProcess:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    data: Path
    log: Path

    @property
    def port(self) -> int:
        return int(self.env["NOTIFIER_PORT"])

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(json.dumps(request).encode() + b"\n")
            answer: dict[str, Any] = json.loads(conn.makefile("rb").readline())
            return answer

    def answers_ping(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"exited with {self.process.returncode}:\n{self.output()}")
        try:
            return self.request({"op": "ping"}) == {"ok": True}
        except OSError:
            return False


def image_environment(installed: Installed, data: Path) -> dict[str, str]:
    """The Dockerfile's ENV with /data moved to ``data``, free ports, and loopback only."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NOTIFIER_", "PYTHON", "VIRTUAL_ENV"))
    }
    for key, value in Dockerfile.read().env().items():
        if key == "PATH":
            assert value.endswith(":$PATH")
            value = f"{installed.bin}:{os.environ['PATH']}"
        elif key.startswith("NOTIFIER_") and key.endswith("_PORT"):
            value = str(free_port())
        else:
            assert "$" not in value, f"ENV {key}: unexpected substitution"
            value = re.sub(r"(?<![\w.])/data(?=/|$)", str(data), value)
        env[key] = value
    # The image binds 0.0.0.0 (checked above); tests listen on loopback only.
    env["NOTIFIER_HOST"] = "127.0.0.1"
    return env


@pytest.fixture
def image_process(installed: Installed, tmp_path: Path) -> Iterator[ImageProcess]:
    data = tmp_path / "data"  # the /data volume, and the WORKDIR
    data.mkdir()
    env = image_environment(installed, data)
    command = Dockerfile.read().cmd()
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable is not None and Path(executable).parent == installed.bin, executable
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, env=env, cwd=data, stdout=output, stderr=subprocess.STDOUT
        )
    running = ImageProcess(process, env, data, log)
    try:
        try:
            wait_for_sync(running.answers_ping, timeout=30, what="the image's command to answer")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its output:\n{running.output()}") from None
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def test_the_installed_package_is_the_wheel(installed: Installed, tmp_path: Path) -> None:
    located = subprocess.run(
        [str(installed.bin / "python"), "-c", "import notifier; print(notifier.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert Path(located).is_relative_to(installed.venv), located


def test_image_command_serves_a_send_and_stops_on_sigterm(image_process: ImageProcess) -> None:
    sent = image_process.request(
        {"channel": "email", "to": "ops@example.com", "subject": "container", "text": "hello"}
    )
    assert sent["ok"] is True, sent
    job_id = sent["id"]

    def delivered() -> bool:
        return bool(image_process.request({"op": "status", "id": job_id})["status"] == "delivered")

    wait_for_sync(delivered, timeout=30, what=f"job {job_id} to be delivered")
    # No SMTP host in the image's environment: the message is in the outbox in the volume,
    # beside the SQLite file, and nothing was written outside it.
    assert (image_process.data / "outbox" / "email" / f"{job_id}.eml").is_file()
    assert (image_process.data / "notifier.db").is_file()

    image_process.process.send_signal(signal.SIGTERM)
    assert image_process.process.wait(30) == 0, image_process.output()
    assert "Traceback" not in image_process.output()


def test_image_healthcheck_passes_against_the_running_service(
    image_process: ImageProcess,
) -> None:
    result = subprocess.run(
        Dockerfile.read().healthcheck(),
        env=image_process.env,
        cwd=image_process.data,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr + image_process.output()


def test_image_healthcheck_fails_when_nothing_answers(installed: Installed, tmp_path: Path) -> None:
    env = image_environment(installed, tmp_path)  # a free port, with nothing listening on it
    result = subprocess.run(
        Dockerfile.read().healthcheck(),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
