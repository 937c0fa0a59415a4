"""``notifier send-many`` against the real service: what is stored, delivered and reported.

The command runs through ``notifier.cli.main`` in an executor thread, as in
test_cli_client.py, while the in-process server runs in the loop.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from pathlib import Path

import pytest

from notifier import AsyncClient
from notifier.cli import main
from notifier.cli import send_many as cli_send_many
from tests.support.http_sink import HTTPSink, Reply
from tests.support.server import RunningServer, running_server
from tests.support.waiting import wait_for


@pytest.fixture(autouse=True)
def _no_client_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFIER_HOST", "NOTIFIER_PORT", "NOTIFIER_TOKEN", "NOTIFIER_CA_FILE"):
        monkeypatch.delenv(name, raising=False)


async def send_many(server: RunningServer, *argv: str | Path) -> int:
    command = ["send-many", "--port", str(server.port), *map(str, argv)]
    return await asyncio.get_running_loop().run_in_executor(None, main, command)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sms_rows(count: int) -> list[list[str]]:
    return [["sms", f"+1415555{n:04}", f"Your code is {n:04}"] for n in range(count)]


def outbox_lines(server: RunningServer) -> list[dict[str, str]]:
    path = server.outbox / "sms.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def outbox_count(server: RunningServer) -> int:
    """Cheap enough to poll while the server, in this same loop, writes the outbox."""
    path = server.outbox / "sms.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def stored_jobs(server: RunningServer) -> int:
    async with AsyncClient("127.0.0.1", server.port) as client:
        return len(await client.jobs(limit=1000))


async def test_ten_thousand_rows_are_delivered_once_and_a_rerun_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_send_many, "LINE_INTERVAL", 0.0)  # a progress line per chunk
    rows = write_csv(tmp_path / "codes.csv", ["channel", "to", "text"], sms_rows(10_000))
    async with running_server(tmp_path) as server:
        assert await send_many(server, rows) == 0
        out, err = capsys.readouterr()
        assert out == "stored 10000 new job(s), 0 already stored (duplicates), 0 refused\n"
        progress = [line.split(" rows, ")[0] for line in err.splitlines()]
        assert progress == [f"sending: {n}/10000" for n in range(500, 10_001, 500)]
        assert "\r" not in err and "\x1b" not in err
        await wait_for(lambda: outbox_count(server) >= 10_000, timeout=60, what="10,000 sent")

        assert await send_many(server, rows) == 0
        out, _ = capsys.readouterr()
        assert out == "stored 0 new job(s), 10000 already stored (duplicates), 0 refused\n"
    texts = [line["text"] for line in outbox_lines(server)]
    assert sorted(texts) == [f"Your code is {n:04}" for n in range(10_000)]


async def test_after_an_interruption_only_the_rest_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = ["channel", "to", "text"], sms_rows(5)
    async with running_server(tmp_path) as server:
        path = write_csv(tmp_path / "codes.csv", header, rows[:3])
        assert await send_many(server, path) == 0
        write_csv(path, header, [rows[0], ["sms", "+14155559999", "new"], *rows[1:]])
        assert await send_many(server, path, "--wait") == 0
        out, _ = capsys.readouterr()
        assert "stored 3 new job(s), 3 already stored (duplicates), 0 refused\n" in out
        assert await stored_jobs(server) == 6


BAD_ROWS = [
    ["sms", "+14155550101", "fine", ""],
    ["sms", "", "no recipient", ""],
    ["sms", "+14155550102", "spans\ntwo lines", ""],
    ["sms", "+14155550103", "too urgent", "urgent"],
]


async def test_bad_rows_are_reported_by_line_and_nothing_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "jobs.csv", ["channel", "to", "text", "priority"], BAD_ROWS)
    async with running_server(tmp_path) as server:
        assert await send_many(server, path) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.splitlines() == [
            f"{path}:3: to: required",
            f"{path}:6: priority: Input should be 'high', 'normal' or 'low'",
            "error: invalid_request: 2 of 4 rows are invalid; nothing was sent "
            "(--skip-invalid sends the others)",
        ]
        assert await stored_jobs(server) == 0


async def test_skip_invalid_sends_the_valid_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "jobs.csv", ["channel", "to", "text", "priority"], BAD_ROWS)
    async with running_server(tmp_path) as server:
        assert await send_many(server, path, "--skip-invalid", "--wait") == 0
        out, err = capsys.readouterr()
        assert f"{path}:3: to: required\n" in err
        assert out.startswith("stored 2 new job(s), 0 already stored (duplicates), 0 refused\n")
        assert sorted(line["text"] for line in outbox_lines(server)) == [
            "fine",
            "spans\ntwo lines",
        ]


async def test_json_lines_one_job_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "hello.sms.j2").write_text("Hello, {{ name }}!")
    jobs = [
        {"channel": "sms", "to": ["+14155550101", "+14155550102"], "text": "both"},
        {"channel": "sms", "to": "+14155550103", "template": "hello", "data": {"name": "Ada"}},
        {"channel": "sms", "to": "+14155550104", "text": "no key", "send_at": None},
    ]
    lines = [json.dumps(job) for job in jobs]
    path = tmp_path / "jobs.txt"
    path.write_text(f"{lines[0]}\n\n{lines[1]}\n{lines[2]}\n")
    async with running_server(tmp_path) as server:
        assert await send_many(server, path, "--format", "jsonl", "--wait") == 0
        out, _ = capsys.readouterr()
        assert out.startswith("stored 3 new job(s), 0 already stored (duplicates), 0 refused\n")
        texts = sorted(line["text"] for line in outbox_lines(server))
        assert texts == ["Hello, Ada!", "both", "both", "no key"]

        path.write_text(f'{lines[0]}\n["not", "an object"]\n{{"channel": \n')
        assert await send_many(server, path, "--format", "jsonl") == 1
        _, err = capsys.readouterr()
        assert f"{path}:2: must be a JSON object (one job per line)\n" in err
        assert f"{path}:3: not valid JSON: " in err


async def test_data_columns_fill_the_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "welcome.sms.j2").write_text("Welcome, {{ name }} from {{ city }}!")
    header = ["channel", "to", "template", "data.name", "data.city"]
    rows = [["sms", "+14155550101", "welcome", "Ada", "London"]]
    rows.append(["sms", "+14155550102; +14155550103", "welcome", "Grace", "New York"])
    path = write_csv(tmp_path / "welcome.csv", header, rows)
    async with running_server(tmp_path) as server:
        assert await send_many(server, path, "--wait") == 0
        sent = sorted((line["to"], line["text"]) for line in outbox_lines(server))
    assert sent == [
        ("+14155550101", "Welcome, Ada from London!"),
        ("+14155550102", "Welcome, Grace from New York!"),
        ("+14155550103", "Welcome, Grace from New York!"),
    ]


async def test_wait_summarises_statuses_and_lists_the_failed_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], http_sink: HTTPSink
) -> None:
    http_sink.respond_with(
        lambda request: Reply(400, "no such number") if b"5550109" in request.body else Reply(200)
    )
    gateway = {"sms_provider": "webhook", "sms_url": http_sink.url + "/sms"}
    rows = [*sms_rows(3), ["sms", "+14155550109", "lost"], ["sms", "+14155550110", "x"]]
    path = write_csv(tmp_path / "codes.csv", ["channel", "to", "text"], rows)
    async with running_server(tmp_path, **gateway) as server:
        assert await send_many(server, path, "--wait") == 1
        out, err = capsys.readouterr()
    summary = out.splitlines()
    assert summary[:4] == [
        "stored 5 new job(s), 0 already stored (duplicates), 0 refused",
        "status     jobs",
        "delivered  4   ",
        "failed     1   ",
    ]
    assert summary[5].split()[:3] == ["line", "id", "status"]
    failed = summary[6].split(maxsplit=3)
    assert failed[0] == "5" and failed[2] == "failed" and "400" in failed[3]
    assert err.splitlines()[-1].startswith("waiting: 5/5 rows, ")


async def test_wait_gives_up_after_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = (
        ["channel", "to", "text", "send_at"],
        [["sms", "+14155550101", "x", "2100-01-01T00:00:00Z"]],
    )
    path = write_csv(tmp_path / "later.csv", header, rows)
    async with running_server(tmp_path) as server:
        assert await send_many(server, path, "--wait", "--timeout", "0.05") == 1
        err = capsys.readouterr().err
    assert err.endswith("error: timeout: 1 of 1 jobs not final after 0.05s\n")


async def test_refused_rows_are_reported_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [["sms", "+14155550101", "fine"], ["pigeon", "+14155550102", "coo"]]
    path = write_csv(tmp_path / "jobs.csv", ["channel", "to", "text"], rows)
    async with running_server(tmp_path) as server:
        assert await send_many(server, path) == 1
        out, err = capsys.readouterr()
        assert out == "stored 1 new job(s), 0 already stored (duplicates), 1 refused\n"
        assert f"{path}:3: unknown_channel: " in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("jobs.xlsx", "", "cannot tell the format from the extension; give --format"),
        ("jobs.csv", "", "the file is empty"),
        ("jobs.csv", "channel,to,colour\n", "line 1: unknown column 'colour'"),
        ("jobs.csv", "channel,to,to\n", "line 1: repeated column(s): to"),
        ("missing.csv", None, "cannot read"),
    ],
    ids=["extension", "empty", "unknown-column", "repeated-column", "missing"],
)
async def test_a_file_that_is_not_jobs_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    async with running_server(tmp_path) as server:
        assert await send_many(server, path) == 2
        assert message in capsys.readouterr().err


async def test_a_terminal_gets_a_progress_bar_with_rate_and_time_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    path = write_csv(tmp_path / "codes.csv", ["channel", "to", "text"], sms_rows(20))
    async with running_server(tmp_path) as server:
        assert await send_many(server, path) == 0
    err = capsys.readouterr().err
    assert "sending" in err and "20/20" in err and "rows/s" in err and "0:00:00" in err
