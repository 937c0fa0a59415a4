"""The ``notifier`` client commands against the real service: output and exit codes.

The commands run through ``notifier.cli.main`` in the loop's executor threads (they block,
and the in-process server must keep running), and once as a real ``python -m notifier``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from notifier import AsyncClient, JobStatus
from notifier.cli import main
from tests.support.http_sink import HTTPSink, Reply
from tests.support.server import RunningServer, free_port, running_server

ROOT = Path(__file__).resolve().parent.parent
SMS = ["--channel", "sms", "--to", "+14155550101"]


@pytest.fixture(autouse=True)
def _no_client_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFIER_HOST", "NOTIFIER_PORT", "NOTIFIER_TOKEN", "NOTIFIER_CA_FILE"):
        monkeypatch.delenv(name, raising=False)


async def notifier(*argv: str) -> int:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, main, list(argv))


def output(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


async def status_of(server: RunningServer, job: str) -> JobStatus:
    async with AsyncClient("127.0.0.1", server.port) as client:
        return (await client.status(job)).status


async def test_send_prints_the_id_and_status_shows_the_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(tmp_path) as server:
        monkeypatch.setenv("NOTIFIER_PORT", str(server.port))
        code = await notifier(
            "send", "--channel", "email", "--to", "ada@example.com", "--to", "bob@example.com",
            "--cc", "carol@example.com", "--subject", "Hi", "--text", "Hello",
            "--html", "<p>Hello</p>", "--wait",
        )  # fmt: skip
        out, err = output(capsys)
        assert code == 0, err
        job = out.strip()
        assert out == f"{job}\n" and err == f"job {job}: delivered\n"
        message = (server.outbox / "email" / f"{job}.eml").read_text()
        assert "bob@example.com" in message and "Cc: carol@example.com" in message

        assert await notifier("status", job) == 0
        out, _ = output(capsys)
        assert f"id          {job}\n" in out and "status      delivered\n" in out

        assert await notifier("status", job, "--json") == 0
        shown = json.loads(output(capsys)[0])
        async with AsyncClient("127.0.0.1", server.port) as client:
            assert shown == (await client.status(job)).as_dict()


async def test_template_data_inline_or_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "welcome.sms.j2").write_text("Welcome, {{ name }}!")
    (tmp_path / "data.json").write_text('{"name": "Grace"}')
    async with running_server(tmp_path) as server:
        port = ["--port", str(server.port)]
        inline = ["--template", "welcome", "--data", '{"name": "Ada"}', "--wait"]
        assert await notifier("send", *port, *SMS, *inline) == 0
        from_file = ["--template", "welcome", "--data-file", str(tmp_path / "data.json"), "--wait"]
        assert await notifier("send", *port, *SMS, *from_file) == 0
        out, _ = output(capsys)
        lines = (server.outbox / "sms.jsonl").read_text().splitlines()
        texts = [json.loads(line)["text"] for line in lines]
        assert texts == ["Welcome, Ada!", "Welcome, Grace!"]
        assert len(out.split()) == 2


async def test_same_idempotency_key_same_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_server(tmp_path) as server:
        send = ["send", "--port", str(server.port), *SMS, "--text", "x"]
        for _ in range(2):
            assert await notifier(*send, "--idempotency-key", "order-17") == 0
        first, second = output(capsys)[0].split()
        assert first == second


async def test_send_at_then_cancel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    async with running_server(tmp_path) as server:
        port = ["--port", str(server.port)]
        assert await notifier("send", *port, *SMS, "--text", "later", "--send-at", tomorrow) == 0
        job = output(capsys)[0].strip()
        assert await notifier("send", *port, *SMS, "--text", "x", "--send-at", tomorrow,
                              "--wait", "--timeout", "0.05") == 1  # fmt: skip
        assert output(capsys)[1].startswith("error: timeout: job ")
        assert await notifier("cancel", *port, job) == 0
        assert output(capsys)[0] == f"cancelled {job}\n"
        assert await status_of(server, job) is JobStatus.CANCELLED


async def test_a_failed_delivery_with_wait_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], http_sink: HTTPSink
) -> None:
    http_sink.respond_with(lambda request: Reply(400, "no such number"))
    gateway = {"sms_provider": "webhook", "sms_url": http_sink.url + "/sms"}
    async with running_server(tmp_path, **gateway) as server:
        code = await notifier("send", "--port", str(server.port), *SMS, "--text", "x", "--wait")
        out, err = output(capsys)
        assert code == 1 and out.strip()
        assert err.startswith("error: failed: ") and "400" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status", "no-such-job"], "error: not_found: id: no such job\n"),
        (["cancel", "no-such-job"], "error: not_found: id: no such job\n"),
        (["send", "--channel", "pigeon", "--to", "7", "--text", "coo"], "error: unknown_channel:"),
        (["send", *SMS], "error: invalid_request: "),
        (["send", *SMS, "--text", "x", "--send-at", "tomorrow"], "error: invalid_request: send_at"),
    ],
    ids=["status", "cancel", "unknown-channel", "no-text", "bad-send-at"],
)
async def test_error_answers_exit_1_with_code_and_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    async with running_server(tmp_path) as server:
        assert await notifier(*argv, "--port", str(server.port)) == 1
    out, err = output(capsys)
    assert out == "" and err.startswith(expected), err


async def test_token_from_option_or_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(tmp_path, auth_tokens="alpha") as server:
        send = ["send", "--port", str(server.port), *SMS, "--text", "x"]
        assert await notifier(*send) == 1
        assert output(capsys)[1].startswith("error: unauthorized: ")
        assert await notifier(*send, "--token", "alpha") == 0
        monkeypatch.setenv("NOTIFIER_TOKEN", "alpha")
        assert await notifier(*send) == 0
        assert await notifier(*send, "--token", "wrong") == 1


async def test_ping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_server(tmp_path) as server:
        assert await notifier("ping", "--port", str(server.port)) == 0
    assert output(capsys) == ("ok\n", "")
    assert await notifier("ping", "--port", str(free_port()), "--retry-timeout", "0") == 1
    assert output(capsys)[1].startswith("error: connection: cannot connect to notifier at ")


async def test_bad_arguments_and_settings_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exited:
        await notifier("send", *SMS, "--template", "t", "--data", "[1]")
    assert exited.value.code == 2 and "--data: must be a JSON object" in output(capsys)[1]
    monkeypatch.setenv("NOTIFIER_PORT", "seventy")
    assert await notifier("ping") == 2
    assert output(capsys)[1].startswith("error: settings: NOTIFIER_PORT")


async def test_as_a_process(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:

        async def run(*argv: str) -> tuple[int, str, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "notifier", *argv, "--port", str(server.port),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode is not None
            return process.returncode, out.decode(), err.decode()

        code, out, err = await run("send", *SMS, "--text", "from a shell")
        assert code == 0 and err == "", err
        assert await status_of(server, out.strip()) in set(JobStatus)
        code, out, err = await run("status", "no-such-job")
        assert (code, out, err) == (1, "", "error: not_found: id: no such job\n")


async def test_suppression_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_server(tmp_path) as server:
        port = ["--port", str(server.port)]
        assert await notifier("suppress", *port, "ada@example.com", "--reason", "asked") == 0
        assert await notifier("suppress", *port, "bob@example.com") == 0
        assert output(capsys) == ("suppressed ada@example.com\nsuppressed bob@example.com\n", "")

        assert await notifier("suppressions", *port) == 0
        header, ada, bob = output(capsys)[0].splitlines()
        assert header.split() == ["address", "created_at", "reason"]
        assert ada.split()[::2] == ["ada@example.com", "asked"]
        assert bob.split()[0] == "bob@example.com"
        assert await notifier("suppressions", *port, "--json") == 0
        lines = [json.loads(line) for line in output(capsys)[0].splitlines()]
        assert [line["address"] for line in lines] == ["ada@example.com", "bob@example.com"]

        assert await notifier("unsuppress", *port, "ada@example.com") == 0
        assert output(capsys) == ("unsuppressed ada@example.com\n", "")
        assert await notifier("unsuppress", *port, "ada@example.com") == 1
        assert output(capsys) == ("", "error: not_found: ada@example.com was not suppressed\n")


async def test_send_passes_the_fields_of_version_1_1_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_server(tmp_path) as server:
        options = [
            *("--priority", "high", "--collapse-key", "otp:42"),
            *("--send-at", "2999-01-01T00:00Z", "--callback-url", "https://a.example/cb"),
        ]
        argv = ["send", "--port", str(server.port), *SMS, "--text", "x", *options]
        assert await notifier(*argv) == 0
        job_id = output(capsys)[0].strip()
        async with AsyncClient("127.0.0.1", server.port) as client:
            status = (await client.status(job_id)).as_dict()
    assert status["priority"] == "high"
    assert status["callback"]["state"] == "pending"
    with pytest.raises(SystemExit):
        await notifier("send", *SMS, "--text", "x", "--priority", "urgent")
    assert "--priority: invalid choice: 'urgent'" in output(capsys)[1]


def test_the_commands_use_only_the_public_client_api() -> None:
    tree = ast.parse((ROOT / "notifier" / "cli" / "client.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in modules if m and m.startswith("notifier.")}, "import from notifier"
    private = [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and isinstance(node.value, ast.Name)
        and node.value.id in ("client", "Client")
    ]
    assert private == []
