"""The monitoring files in deploy/: the Grafana dashboard and the Prometheus alert rules.

promtool (Debian's ``prometheus`` package; .ci/run installs it) checks the rules, runs their
unit tests in tests/data/prometheus/ and parses every dashboard query. The real service, with
email and SMS jobs flowing through it, is scraped to show that every ``notifier_*`` metric the
dashboard and the alerts name is one it exports: a renamed metric breaks this test, not a
dashboard nobody looks at until the night it is needed. Then a real Prometheus (same package)
scrapes that service and evaluates every rule and panel query on its data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml

from tests.support.http_sink import HTTPSink
from tests.support.prometheus import metric
from tests.support.server import LineConnection, free_port, running_server
from tests.support.smtp import running_smtp_sink
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "notifier.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS_TEST = ROOT / "tests" / "data" / "prometheus" / "alerts_test.yml"

APT_HINT = "apt-get update && apt-get install -y prometheus"
NOTIFIER_METRIC = re.compile(r"\bnotifier_[a-zA-Z0-9_]+")
#: Grafana's variables, replaced by what Grafana would put there, so promtool can parse a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "6h", "$job": ".+", "$instance": ".+"}
#: Sample names of a family declared in the text format; counters are declared as ``*_total``.
SAMPLE_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum")}


# --- reading the files ---------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict[str, Any]) -> dict[str, str]:
    """Each panel query and template variable query, by where it is (for failure messages)."""
    queries = {
        f"panel {panel['title']!r} target {target['refId']}": target["expr"]
        for panel in panels(board)
        for target in panel.get("targets", [])
    }
    for variable in board["templating"]["list"]:
        queries[f"variable {variable['name']!r}"] = variable["query"]["query"]
    return queries


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def as_promql(query: str) -> str:
    """The query as Prometheus receives it from Grafana; ``label_values(...)`` is Grafana's own."""
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    label_values = re.fullmatch(r"label_values\((.+), *\w+\)", query)
    return label_values[1] if label_values else query


def sample_names(text: str) -> set[str]:
    return {
        sample[0]
        for line in text.splitlines()
        if not line.startswith("#") and (sample := re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line))
    }


def exported_names(text: str) -> set[str]:
    """The sample names a scrape can hold: every declared family's, whether or not it has a
    sample yet (a labelled counter has none until its first event), and every sample's."""
    names = sample_names(text)
    for declared in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        name, kind = declared.groups()
        names.update(name + suffix for suffix in SAMPLE_SUFFIXES.get(kind, ("",)))
    return names


def promtool(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip(f"promtool is not installed ({APT_HINT})")
    return subprocess.run(
        [binary, *arguments], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def assert_succeeds(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def all_queries() -> dict[str, str]:
    """The dashboard's queries and the alert expressions, by where they are."""
    return {
        **{f"dashboard {where}": query for where, query in dashboard_queries(dashboard()).items()},
        **{f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()},
    }


# --- running Prometheus --------------------------------------------------------------------


@dataclass
class Prometheus:
    """A real Prometheus server's HTTP API."""

    http: httpx.AsyncClient

    async def api(self, path: str, **params: str) -> Any:
        body = (await self.http.get(f"/api/v1/{path}", params=params)).json()
        assert body["status"] == "success" and not body.get("warnings"), (path, params, body)
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self.api("query", query=promql))["result"]
        return result

    async def rules(self) -> list[dict[str, Any]]:
        groups = (await self.api("rules"))["groups"]
        return [rule for group in groups for rule in group["rules"]]


@asynccontextmanager
async def running_prometheus(directory: Path, metrics_url: str) -> AsyncIterator[Prometheus]:
    """Prometheus on 127.0.0.1 with deploy/prometheus's config, pointed at ``metrics_url``,
    scraping and evaluating the rules every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(f"prometheus is not installed ({APT_HINT})")
    directory.mkdir()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [httpx.URL(metrics_url).netloc.decode()]}
    ]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://{address}") as http:

            async def ready() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"prometheus exited: {log_path.read_text()}")
                try:
                    return (await http.get("/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout=30, what=f"prometheus on {address}")
            yield Prometheus(http)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- Prometheus ----------------------------------------------------------------------------


def test_alert_rules_are_valid() -> None:
    assert_succeeds(promtool("check", "rules", str(ALERTS)))


def test_alert_rules_pass_their_unit_tests() -> None:
    assert_succeeds(promtool("test", "rules", str(ALERTS_TEST)))


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fired == set(), "alerts no unit test fires"
    assert fired <= alerts, "unit tests of alerts that do not exist"


def test_the_example_prometheus_config_loads_the_rules() -> None:
    assert_succeeds(promtool("check", "config", str(PROMETHEUS_CONFIG)))
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert [job["job_name"] for job in config["scrape_configs"]] == ["notifier"]
    assert (PROMETHEUS_CONFIG.parent / config["rule_files"][0]).resolve() == ALERTS


# --- Grafana -------------------------------------------------------------------------------


def test_the_dashboard_imports_with_a_prometheus_datasource_input() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert [(i["name"], i["type"], i["pluginId"]) for i in board["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    assert board["id"] is None and board["uid"]
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert all(target["datasource"] == source for target in panel["targets"]), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == source, variable["name"]


def test_the_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard()):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for cell in (
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        ):
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r}"
            taken[cell] = panel["title"]


def test_every_dashboard_query_is_promql_naming_a_notifier_metric(tmp_path: Path) -> None:
    queries = dashboard_queries(dashboard())
    assert {where for where, query in queries.items() if not NOTIFIER_METRIC.search(query)} == set()
    # promtool parses PromQL only in rule files: one recording rule per query.
    rules = [
        {"record": f"dashboard:query_{number}", "expr": as_promql(query)}
        for number, query in enumerate(queries.values())
    ]
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_succeeds(promtool("check", "rules", str(rule_file)))


# --- against the real service --------------------------------------------------------------


@asynccontextmanager
async def service_with_traffic(
    tmp_path: Path, tls_ca: trustme.CA, hook: HTTPSink
) -> AsyncIterator[str]:
    """The real service, its /metrics URL once these jobs are final: an email through a real
    SMTP relay (a circuit and a session window to export) with a callback, its duplicate, an
    SMS to a gateway that is down (retried, then failed for good), a line of bad JSON."""
    async with (
        running_smtp_sink("none", tls_ca) as relay,
        running_server(
            tmp_path,
            http_port=free_port(),
            smtp_host=relay.host,
            smtp_port=relay.port,
            smtp_security="none",
            sms_provider="webhook",
            sms_url=f"http://127.0.0.1:{free_port()}/sms",
            retry_max_attempts=2,
        ) as server,
    ):
        assert server.service.ops is not None
        url = f"http://127.0.0.1:{server.service.ops.port}/metrics"
        email = {
            "channel": "email",
            "to": "ada@example.com",
            "subject": "Hi",
            "text": "Hello",
            "idempotency_key": "order-1",
            "callback_url": hook.url + "/hook",
        }
        conn = await LineConnection.open(server.port)
        await conn.send(email, email, {"channel": "sms", "to": "+14155550101", "text": "1234"})
        await conn.send(b"{bad json\n")
        for _ in range(4):
            await conn.answer()
        async with httpx.AsyncClient() as http:

            async def final() -> bool:
                text = (await http.get(url)).text
                return all(
                    metric(text, name, labels) == 1
                    for name, labels in (
                        ("notifier_queue_depth", 'status="delivered"'),
                        ("notifier_queue_depth", 'status="failed"'),
                        ("notifier_callbacks_total", 'outcome="sent"'),
                    )
                )

            await wait_for(final, what="the email delivered, its callback sent, the SMS failed")
        await conn.close()
        yield url


async def test_every_metric_named_is_exported_by_the_service(
    tmp_path: Path, tls_ca: trustme.CA, http_sink: HTTPSink
) -> None:
    async with (
        service_with_traffic(tmp_path, tls_ca, http_sink) as url,
        httpx.AsyncClient() as http,
    ):
        scrape = await http.get(url)
    assert scrape.status_code == 200

    exported = exported_names(scrape.text)
    # The scrape is that of a working service: the series the jobs made are there.
    assert {
        "notifier_jobs_delivered_total",
        "notifier_jobs_retried_total",
        "notifier_jobs_failed_total",
        "notifier_jobs_duplicate_total",
        "notifier_callbacks_total",
        "notifier_circuit_state",
        "notifier_smtp_sessions_window",
    } <= sample_names(scrape.text)
    missing = {
        where: sorted(set(NOTIFIER_METRIC.findall(query)) - exported)
        for where, query in all_queries().items()
        if set(NOTIFIER_METRIC.findall(query)) - exported
    }
    assert missing == {}, "metrics the service does not export"


async def test_prometheus_evaluates_every_query_and_rule_against_the_service(
    tmp_path: Path, tls_ca: trustme.CA, http_sink: HTTPSink
) -> None:
    """What only real data shows: a query or rule Prometheus refuses to evaluate (vector
    matching, duplicate label sets) and a panel that stays empty on a working service."""
    async with (
        service_with_traffic(tmp_path, tls_ca, http_sink) as url,
        running_prometheus(tmp_path / "prometheus", url) as prometheus,
    ):
        # Two scrapes after the traffic, so every rate has its two samples.
        await wait_for(
            lambda: prometheus.query("count_over_time(notifier_jobs_delivered_total[1m]) >= 2"),
            timeout=30,
            what="two scrapes by Prometheus",
        )
        seen = {rule["name"]: rule["lastEvaluation"] for rule in await prometheus.rules()}

        async def evaluated_again() -> dict[str, dict[str, Any]] | None:
            rules = {rule["name"]: rule for rule in await prometheus.rules()}
            fresh = all(rule["lastEvaluation"] != seen[name] for name, rule in rules.items())
            return rules if fresh else None

        rules = await wait_for(evaluated_again, timeout=30, what="the rules evaluated again")
        assert {name: rule["health"] for name, rule in rules.items()} == {
            rule["alert"]: "ok" for rule in alert_rules()
        }, {name: rule.get("lastError") for name, rule in rules.items()}
        queries = dashboard_queries(dashboard())
        answers = {where: await prometheus.query(as_promql(q)) for where, q in queries.items()}
    # Empty on a working service only where no event has happened yet (receipts) or while
    # nothing waits (the queue has drained).
    expected_empty = {w for w, query in queries.items() if re.search(r"receipts|waiting", query)}
    assert {where for where, result in answers.items() if not result} == expected_empty
