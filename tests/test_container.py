"""The container files: Dockerfile, .dockerignore, docker-compose.yml and its host override.

Without an engine: the compose files are valid (``docker-compose config``, skipped only when that
binary is missing), every ``${VAR}`` they use is documented in .env.example, and the files have
the shape the image needs (exec-form CMD, non-root, state under the /data volume, health checks).

With an engine (``../shared/tools/container-engine up``; marker ``container``): the image is
built once per session and run with ``--network host``, so every connection stays on
127.0.0.1: deliveries to the outbox volume and to a TLS SMTP sink, the HEALTHCHECK as Docker
runs it, the non-root PID 1, ``docker stop`` losing nothing, the SQLite volume outliving its
container, two containers on one PostgreSQL queue, and the compose file's notifier service
started for real. These skip only when no engine answers and CI is not set; in CI they fail.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
import yaml

from tests.support.server import LineConnection, free_port
from tests.support.smtp import running_smtp_sink
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
HOST_OVERRIDE = ROOT / "deploy" / "compose" / "host.override.yml"
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

    def context_copies(self) -> list[str]:
        """Sources of every COPY from the build context (not --from another stage)."""
        sources: list[str] = []
        for arguments in self.all("COPY"):
            if "--from" not in arguments:
                sources += [p for p in shlex.split(arguments) if not p.startswith("--")][:-1]
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


def compose_file(path: Path = COMPOSE) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    """The variables docker-compose.yml and its host override interpolate."""
    names = set()
    for text in _strings([compose_file(COMPOSE), compose_file(HOST_OVERRIDE)]):
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


@dataclass(frozen=True)
class Compose:
    """docker-compose run in a copy of the compose files, where only the copy's .env and the
    variables given here supply the compose variables."""

    context: Path
    files: tuple[str, ...] = ("docker-compose.yml",)
    variables: tuple[tuple[str, str], ...] = ()

    def command(self, *arguments: str) -> list[str]:
        binary = shutil.which("docker-compose")
        if binary is None:
            pytest.skip(f"the docker-compose binary is not installed ({APT_HINT})")
        files = [option for name in self.files for option in ("-f", name)]
        return [binary, "--project-directory", str(self.context), *files, *arguments]

    def project(self) -> str:
        return dict(self.variables).get("COMPOSE_PROJECT_NAME", self.context.name)

    def environment(self) -> dict[str, str]:
        inherited = {
            k: v
            for k, v in os.environ.items()
            if k not in compose_variables() and not k.startswith("COMPOSE_")
        }
        return {**inherited, **dict(self.variables)}


def docker_compose(context: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    compose = Compose(context)
    return subprocess.run(
        compose.command(*arguments),
        cwd=context,
        env=compose.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def compose_context(tmp_path: Path) -> Path:
    """The compose files beside the Dockerfile, with .env copied from .env.example."""
    for path in (COMPOSE, DOCKERFILE, DOCKERIGNORE, HOST_OVERRIDE):
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
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
    build_runs = [
        i.arguments
        for i in dockerfile.instructions
        if i.keyword == "RUN" and i.stage < dockerfile.final_stage
    ]
    assert any("pip wheel" in run for run in build_runs)
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
    for source in Dockerfile.read().context_copies():
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert not dockerignored("notifier/server.py", patterns)


def test_host_override_runs_notifier_alone_on_the_host_network(compose_context: Path) -> None:
    override = str(HOST_OVERRIDE.relative_to(ROOT))
    compose = Compose(
        compose_context,
        ("docker-compose.yml", override),
        (("HOST_DATABASE_URL", "postgresql://notifier@127.0.0.1:5432/queue"), ("HOST_PORT", "17")),
    )
    result = subprocess.run(
        compose.command("config"),
        cwd=compose_context,
        env=compose.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    notifier = yaml.safe_load(result.stdout)["services"]["notifier"]
    assert notifier["network_mode"] == "host"
    environment = environment_of(notifier)
    assert environment["NOTIFIER_DATABASE_URL"] == "postgresql://notifier@127.0.0.1:5432/queue"
    assert environment["NOTIFIER_PORT"] == "17"
    assert environment["NOTIFIER_HOST"] == environment["NOTIFIER_SMTP_HOST"] == "127.0.0.1"


# --- the image, built and run in a container engine -------------------------------------------

DOCKER = "/usr/bin/docker"  # Debian's client: it builds with BuildKit without the buildx plugin
ENGINE_HINT = "bash ../shared/tools/container-engine up"
#: The uid the Dockerfile's USER names.
NOTIFIER_UID = "10001"
#: Fast retries and polls, so the tests wait on deliveries, not on backoff.
QUICK = {
    "NOTIFIER_POLL_INTERVAL": "0.2",
    "NOTIFIER_RETRY_BASE_DELAY": "0.1",
    "NOTIFIER_RETRY_MAX_DELAY": "0.5",
}
Test = TypeVar("Test", bound=Callable[..., Any])


def in_engine(test: Test) -> Test:
    """Marked ``container``, with time for the session's image build in the first such test."""
    marked: Test = pytest.mark.container(pytest.mark.timeout(1200)(test))
    return marked


async def run(
    *command: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """A command run without blocking the event loop (the SMTP sink serves in it)."""
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{shlex.join(command)}: no answer within {timeout}s") from None
    assert process.returncode is not None
    output, errors = (text.decode(errors="replace") for text in (stdout, stderr))
    return subprocess.CompletedProcess(command, process.returncode, output, errors)


async def docker(*arguments: str, timeout: float = 120) -> str:
    """``docker ARGUMENTS``' output; a non-zero exit fails with docker's own message."""
    # Debian's docker 20.10 builds with BuildKit (RUN --mount) only when asked to.
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    result = await run(DOCKER, *arguments, env=env, timeout=timeout)
    assert result.returncode == 0, f"docker {shlex.join(arguments)}: {result.stderr}"
    return result.stdout.strip()


@dataclass(frozen=True)
class Image:
    id: str
    build_seconds: float
    size: int


@pytest.fixture(scope="session")
def image() -> Image:
    """The image built from this checkout, once per session (warm: seconds, from the cache)."""
    engine = asyncio.run(run(DOCKER, "info")) if os.access(DOCKER, os.X_OK) else None
    if engine is None or engine.returncode != 0:
        message = f"no container engine answers at {DOCKER} ({ENGINE_HINT})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    started = time.monotonic()
    build = ("build", "--network", "host", "--tag", "notifier:test", "--quiet", str(ROOT))
    image_id = asyncio.run(docker(*build, timeout=900))
    seconds = time.monotonic() - started
    size = int(asyncio.run(docker("image", "inspect", "--format", "{{.Size}}", image_id)))
    return Image(image_id, seconds, size)


@dataclass
class Container:
    name: str
    port: int

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        conn = await LineConnection.open(self.port)
        try:
            return await conn.request(request)
        finally:
            await conn.close()

    async def send(self, **job: Any) -> str:
        answer = await self.request(job)
        assert answer["ok"] is True, answer
        job_id: str = answer["id"]
        return job_id

    async def status(self, job_id: str) -> dict[str, Any]:
        answer = await self.request({"op": "status", "id": job_id})
        assert answer["ok"] is True, answer
        return answer

    async def delivered(self, job_id: str) -> bool:
        return (await self.status(job_id))["status"] == "delivered"

    async def inspect(self, field: str) -> str:
        return await docker("inspect", "--format", "{{" + field + "}}", self.name)

    async def logs(self) -> str:
        result = await run(DOCKER, "logs", self.name)
        return result.stdout + result.stderr

    async def answers_ping(self) -> bool:
        try:
            return await self.request({"op": "ping"}) == {"ok": True}
        except OSError:
            if await self.inspect(".State.Running") != "true":
                raise AssertionError(f"{self.name} stopped:\n{await self.logs()}") from None
            return False

    async def started(self) -> Container:
        await wait_for(self.answers_ping, timeout=60, what=f"{self.name} to answer ping")
        return self


class Engine:
    """Containers and volumes of one test, on the host's network, removed after it."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.containers: list[str] = []
        self.volumes: list[str] = []

    async def volume(self) -> str:
        name = await docker("volume", "create", f"notifier-test-{secrets.token_hex(6)}")
        self.volumes.append(name)
        return name

    async def start(self, volume: str, *options: str, **env: str) -> Container:
        """The image's own command, on free ports of 127.0.0.1, with ``volume`` at /data."""
        name = f"notifier-test-{secrets.token_hex(6)}"
        port = free_port()
        settings = {
            "NOTIFIER_HOST": "127.0.0.1",
            "NOTIFIER_PORT": str(port),
            "NOTIFIER_HTTP_PORT": str(free_port()),
            **QUICK,
            **env,
        }
        variables = [option for item in settings.items() for option in ("--env", "=".join(item))]
        self.containers.append(name)
        await docker(
            "run", "--detach", "--name", name, "--network", "host", "--volume", f"{volume}:/data",
            *variables, *options, self.image.id,
        )  # fmt: skip
        return await Container(name, port).started()

    async def remove(self) -> None:
        """All at once: removing a container is slow with the vfs storage driver."""
        await asyncio.gather(*(run(DOCKER, "rm", "--force", name) for name in self.containers))
        await asyncio.gather(*(run(DOCKER, "volume", "rm", "--force", v) for v in self.volumes))


@pytest.fixture
async def engine(image: Image) -> AsyncIterator[Engine]:
    running = Engine(image)
    try:
        yield running
    finally:
        await running.remove()


def email(subject: str, to: str = "ops@example.com", **extra: str) -> dict[str, str]:
    return {"channel": "email", "to": to, "subject": subject, "text": f"{subject}.", **extra}


@in_engine
def test_image_builds_and_its_size_is_reported(
    image: Image, record_property: Callable[[str, object], None]
) -> None:
    megabytes = image.size / 1e6
    record_property("image_size_mb", round(megabytes, 1))
    record_property("image_build_seconds", round(image.build_seconds, 1))
    print(f"image {image.id}: {megabytes:.1f} MB, built in {image.build_seconds:.1f} s")
    assert 50 < megabytes < 1000, "not a notifier image of a sane size"


@in_engine
async def test_outbox_delivery_and_the_sqlite_volume_outlive_the_container(engine: Engine) -> None:
    volume = await engine.volume()
    first = await engine.start(volume)
    job_id = await first.send(**email("kept", idempotency_key="order-1"))
    await wait_for(lambda: first.delivered(job_id), timeout=30, what=f"job {job_id} delivered")
    # No SMTP host: the message is in the outbox, in the volume, written by the image's user.
    message = await docker("exec", first.name, "cat", f"/data/outbox/email/{job_id}.eml")
    assert "Subject: kept" in message
    assert await docker("exec", first.name, "stat", "-c", "%u", "/data/notifier.db") == NOTIFIER_UID
    await docker("rm", "--force", first.name)

    second = await engine.start(volume)
    status = await second.status(job_id)
    assert (status["status"], status["attempts"]) == ("delivered", 1), status
    again = await second.request(email("kept", idempotency_key="order-1"))
    assert (again["id"], again.get("duplicate")) == (job_id, True), again
    listed = await docker("exec", second.name, "ls", "/data/outbox/email")
    assert listed.split() == [f"{job_id}.eml"]


@in_engine
async def test_healthy_non_root_and_delivering_over_tls_to_a_private_ca(
    engine: Engine, tls_ca: trustme.CA, ca_file: Path
) -> None:
    async with running_smtp_sink("ssl", tls_ca) as sink:
        started = await engine.start(
            await engine.volume(),
            "--volume", f"{ca_file}:/etc/notifier/ca.pem:ro",
            NOTIFIER_SMTP_HOST="127.0.0.1",
            NOTIFIER_SMTP_PORT=str(sink.port),
            NOTIFIER_SMTP_SECURITY="ssl",
            NOTIFIER_SMTP_CA_FILE="/etc/notifier/ca.pem",
        )  # fmt: skip
        job_id = await started.send(**email("over TLS"))
        await wait_for(lambda: sink.messages, timeout=30, what="the message at the SMTP sink")
        await wait_for(lambda: started.delivered(job_id), timeout=30, what=f"{job_id} delivered")
        assert sink.messages[0].parsed()["Subject"] == "over TLS"

        # Docker runs the image's HEALTHCHECK itself (every 10 s) until it reports healthy.
        async def healthy() -> bool:
            return await started.inspect(".State.Health.Status") == "healthy"

        await wait_for(healthy, timeout=90, what=f"{started.name} to be healthy")
        # PID 1 is notifier itself (exec form, no shell), as the image's non-root user.
        status = await docker("exec", started.name, "cat", "/proc/1/status")
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert uids == [NOTIFIER_UID] * 4, status
        command = (await docker("exec", started.name, "cat", "/proc/1/cmdline")).split("\0")[:-1]
        assert command[-2:] == ["/opt/notifier/bin/notifier", "serve"], command


@in_engine
async def test_docker_stop_exits_0_and_loses_the_job_sent_just_before(
    engine: Engine, tls_ca: trustme.CA
) -> None:
    async with running_smtp_sink("none", tls_ca) as sink:
        sink.max_sessions = 0  # up, but refusing every session (421): the job stays queued
        started = await engine.start(
            await engine.volume(),
            NOTIFIER_SMTP_HOST="127.0.0.1",
            NOTIFIER_SMTP_PORT=str(sink.port),
            NOTIFIER_SMTP_SECURITY="none",
            NOTIFIER_RETRY_MAX_ATTEMPTS="1000",
            NOTIFIER_CIRCUIT_FAILURES="1000",
        )
        job_id = await started.send(**email("just before stop"))  # answered: stored
        # SIGTERM; SIGKILL only after 30 s, three times the default NOTIFIER_SHUTDOWN_GRACE.
        await docker("stop", "--time", "30", started.name, timeout=60)
        assert await started.inspect(".State.ExitCode") == "0", await started.logs()
        assert "Traceback" not in await started.logs()
        assert sink.messages == []

        sink.max_sessions = None
        await docker("start", started.name)
        await started.started()
        await wait_for(lambda: started.delivered(job_id), timeout=30, what=f"{job_id} delivered")
        assert [m.parsed()["Subject"] for m in sink.messages] == ["just before stop"]


@in_engine
@pytest.mark.postgres
async def test_two_containers_share_one_postgres_queue(
    engine: Engine, postgres_url: str, tls_ca: trustme.CA
) -> None:
    async with running_smtp_sink("none", tls_ca) as sink:
        relay = {
            "NOTIFIER_DATABASE_URL": postgres_url,
            "NOTIFIER_SMTP_HOST": "127.0.0.1",
            "NOTIFIER_SMTP_PORT": str(sink.port),
            "NOTIFIER_SMTP_SECURITY": "none",
        }
        instances = [await engine.start(await engine.volume(), **relay) for _ in range(2)]
        sent = {await instances[n % 2].send(**email(f"job {n}")): f"job {n}" for n in range(10)}

        async def all_delivered() -> bool:
            # Each job's status asked of the other instance than the one that took it.
            for n, job_id in enumerate(sent):
                if not await instances[(n + 1) % 2].delivered(job_id):
                    return False
            return True

        await wait_for(all_delivered, timeout=60, what="all ten jobs delivered")
        assert sorted(m.parsed()["Subject"] for m in sink.messages) == sorted(sent.values())
        for job_id in sent:
            assert (await instances[0].status(job_id))["attempts"] == 1


@in_engine
@pytest.mark.postgres
async def test_compose_notifier_service_on_the_host_network(
    image: Image, compose_context: Path, postgres_url: str, tls_ca: trustme.CA
) -> None:
    port, http_port = free_port(), free_port()
    async with running_smtp_sink("none", tls_ca) as sink:
        compose = Compose(
            compose_context,
            ("docker-compose.yml", str(HOST_OVERRIDE.relative_to(ROOT))),
            (
                ("COMPOSE_PROJECT_NAME", f"notifier-test-{secrets.token_hex(6)}"),
                ("HOST_IMAGE", "notifier:test"),
                ("HOST_DATABASE_URL", postgres_url),
                ("HOST_PORT", str(port)),
                ("HOST_HTTP_PORT", str(http_port)),
                ("HOST_SMTP_PORT", str(sink.port)),
            ),
        )

        async def compose_run(*arguments: str) -> str:
            result = await run(*compose.command(*arguments), env=compose.environment())
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        # `run`, not `up`: Compose 1.29 refuses the host network beside the base file's
        # published ports, which an override can add to but not remove; `run` publishes none.
        name = f"{compose.project()}-notifier"
        try:
            await compose_run("run", "--detach", "--no-deps", "--name", name, "notifier")
            service = await Container(name, port).started()
            assert await service.inspect(".Image") == image.id
            assert await service.inspect(".HostConfig.NetworkMode") == "host"
            job_id = await service.send(**email("via compose"))
            await wait_for(lambda: service.delivered(job_id), timeout=30, what=f"{job_id} sent")
            assert [m.parsed()["Subject"] for m in sink.messages] == ["via compose"]
        finally:
            await run(DOCKER, "rm", "--force", name)
            await compose_run("down", "--volumes")
