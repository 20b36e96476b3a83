"""The coordinator dashboard's JSON API against a state built by the tests (tests/dashboard_state.py):
what each endpoint answers, that contributor text comes back as plain strings, and that malformed
requests get 4xx JSON (never a traceback) from a server bound to loopback by default."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dashboard_state import NOT_BETTER, PUBLISHED, REJECT_REASON, XSS, build_state

from coordinator.dashboard.address import DashboardError, parse_bind, url_of
from coordinator.dashboard.models import Identity
from coordinator.dashboard.server import STATIC, DashboardServer, DashboardSource

COORD_KEY = b"ssh-rsa AAAAcoordinator"
IDENTITY = Identity(network="umm-test", public_key="ssh-rsa AAAAcoordinator", checkpoint_address="127.0.0.1:5000",
                    status_address="127.0.0.1:5001", version="0.0.test")


def _get(url: str, method: str = "GET") -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body else {}, dict(e.headers)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return build_state(tmp_path_factory.mktemp("dash"))


@pytest.fixture(scope="module")
def server(state):
    def providers(h: str) -> list[tuple[bytes, str]]:
        assert h == state.merged
        return [(b"ssh-rsa AAAAcode", "127.0.0.1:4002"), (COORD_KEY, "127.0.0.1:5000")]

    srv = DashboardServer(DashboardSource(state.db_path, lambda: IDENTITY, providers, COORD_KEY)).start()
    yield srv
    srv.stop()


def api(server, path: str) -> dict:
    status, body, _ = _get(server.url + path.lstrip("/"))
    assert status == 200, body
    return body


def test_it_binds_loopback_by_default(server):
    assert server.address[0] == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")


def test_the_leaderboard_ranks_per_domain_with_verdicts_and_names_as_plain_text(server, state):
    lb = api(server, "/api/leaderboard")
    assert lb["ranked_in_round"] == 1
    boards = {d["domain"]: d["rows"] for d in lb["domains"]}
    assert list(boards) == ["code", "math"]
    assert [(r["rank"], r["model"]["manifest_hash"], r["score"]) for r in boards["code"]] == [
        (1, state.code, 0.4), (2, state.math, 0.1)]
    top_math = boards["math"][0]
    assert top_math["model"]["name"] == XSS  # returned as the string it is; the page writes it as text
    assert top_math["model"]["short_hash"] == state.math[:12]
    assert top_math["verdict"] == "admitted" and top_math["ci_low"] is None
    unranked = {r["model"]["manifest_hash"]: r for r in lb["unranked"]}
    assert unranked[state.rejected]["verdict"] == "rejected"
    assert unranked[state.rejected]["reason"] == REJECT_REASON
    assert unranked[state.pending]["verdict"] == "pending"
    assert "provider unreachable" in unranked[state.pending]["reason"]
    assert lb["merged"]["model"]["manifest_hash"] == state.merged and lb["merged"]["objective"] == 0.5


def test_rounds_are_listed_newest_first_with_their_state_and_stage(server, state):
    rounds = api(server, "/api/rounds")["rounds"]
    assert [(r["number"], r["state"], r["published"]) for r in rounds] == [(2, "no_improvement", False),
                                                                            (1, "published", True)]
    assert rounds[1]["merged"]["manifest_hash"] == state.merged
    assert [r["number"] for r in api(server, "/api/rounds?limit=1")["rounds"]] == [2]


def test_a_round_shows_its_plan_decision_figures_and_merged_vs_sources(server, state):
    d = api(server, "/api/rounds/1")
    assert [s["name"] for s in d["steps"]][:2] == ["discover", "fetch"]
    assert d["plan"]["kind"] == "evolve"
    assert [[m["manifest_hash"] for m in s["models"]] for s in d["plan"]["stages"]] == [[state.math, state.code]]
    dec = d["decision"]
    assert dec["published"] is True and dec["text"] == PUBLISHED
    figures = {f["name"]: f["value"] for f in dec["figures"]}
    assert figures["merged objective (test)"] == 0.5
    assert figures["best source objective (test)"] == 0.3
    assert figures["merged − best source"] == pytest.approx(0.2)
    gain = next(f for f in dec["figures"] if f["name"] == "diff_vs_best_source")  # the decision's interval
    assert (gain["value"], gain["ci_low"], gain["ci_high"]) == (0.2, 0.05, 0.35)
    comp = d["comparison"]
    assert comp["tasks"] == ["synth-code", "synth-math"]
    assert [(m["role"], m["model"]["manifest_hash"], m["objective"]) for m in comp["models"]] == [
        ("merged", state.merged, 0.5), ("source", state.math, 0.3), ("source", state.code, 0.25)]
    assert [(j["kind"], j["status"]) for j in d["jobs"]] == [("combine", "done")]


def test_a_round_without_improvement_says_so_with_the_figure_it_had_to_beat(server, state):
    d = api(server, "/api/rounds/2")
    assert d["decision"]["published"] is False and d["decision"]["state"] == "no_improvement"
    assert d["decision"]["text"] == NOT_BETTER
    assert {"name": "previously published objective", "value": 0.5, "ci_low": None, "ci_high": None} in \
        d["decision"]["figures"]
    assert d["plan"]["kind"] == "combine" and d["plan"]["pivot"]["manifest_hash"] == state.math
    assert [s["name"] for s in d["plan"]["stages"]] == ["fuse", "evolve"]
    assert d["comparison"] is None


def test_curves_come_from_the_jobs_run_folders(server):
    c1 = api(server, "/api/curves/1")
    best = next(s for s in c1["evolve"]["series"] if s["name"] == "best so far")
    assert [(p["x"], p["y"]) for p in best["points"]] == [(0, 0.30), (1, 0.42), (2, 0.47)]
    assert c1["fusion"] is None
    c2 = api(server, "/api/curves/2")
    assert c2["evolve"]["series"] == []  # the search has not started
    loss = next(s for s in c2["fusion"]["series"] if s["name"] == "loss")
    assert [(p["x"], p["y"]) for p in loss["points"]] == [(1, 2.0), (2, 1.6), (3, 1.3)]
    assert c2["fusion"]["job"]["status"] == "running"


def test_nodes_list_the_experts_and_the_merged_models_providers(server, state):
    n = api(server, "/api/nodes")
    assert n["merged"]["manifest_hash"] == state.merged and n["providers_error"] == ""
    assert [(p["name"], p["address"]) for p in n["providers"]] == [("coordinator", "127.0.0.1:5000"),
                                                                    ("code-expert", "127.0.0.1:4002")]
    assert {e["name"]: e["address"] for e in n["experts"]}[XSS] == "127.0.0.1:4001"
    assert len(n["experts"]) == 4


def test_identity_gives_the_network_and_the_coordinators_key(server):
    assert api(server, "/api/identity") == IDENTITY.model_dump()


@pytest.mark.parametrize("path,method,status", [
    ("/api/rounds/abc", "GET", 400), ("/api/rounds/0", "GET", 400), ("/api/rounds/-1", "GET", 400),
    ("/api/rounds/99999999999", "GET", 400), ("/api/rounds/99", "GET", 404), ("/api/curves/x", "GET", 400),
    ("/api/curves/99", "GET", 404), ("/api/rounds?limit=-3", "GET", 400), ("/api/rounds?limit=zz", "GET", 400),
    ("/api/nothing", "GET", 404), ("/etc/passwd", "GET", 404), ("/../state.db", "GET", 404),
    ("/api/leaderboard", "POST", 405), ("/api/rounds/1", "DELETE", 405), ("/", "PUT", 405),
])
def test_malformed_requests_get_a_4xx_json_error_never_a_traceback(server, path, method, status):
    code, body, headers = _get(server.url.rstrip("/") + path, method)
    assert code == status
    assert body["status"] == status and body["error"]
    assert "Traceback" not in json.dumps(body)
    assert headers["Content-Type"].startswith("application/json")


def test_the_page_is_served_with_a_policy_that_runs_only_its_own_script(server):
    with urllib.request.urlopen(server.url, timeout=30) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert '<script src="/dashboard.js"' in html
    js = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js  # every value goes through textContent / createTextNode


def test_a_dht_that_fails_shows_as_an_error_on_the_nodes_not_a_failed_request(state):
    def providers(h: str) -> list[tuple[bytes, str]]:
        raise TimeoutError("DHT get: no answer within 5 s")

    srv = DashboardServer(DashboardSource(state.db_path, lambda: IDENTITY, providers, COORD_KEY)).start()
    try:
        n = api(srv, "/api/nodes")
    finally:
        srv.stop()
    assert n["providers"] == [] and "no answer within 5 s" in n["providers_error"]
    assert len(n["experts"]) == 4


def test_before_the_coordinator_wrote_its_state_the_api_says_so(tmp_path):
    srv = DashboardServer(DashboardSource(tmp_path / "state.db", lambda: IDENTITY)).start()
    try:
        code, body, _ = _get(srv.url + "api/leaderboard")
    finally:
        srv.stop()
    assert code == 503 and "no state yet" in body["error"]


def test_a_port_in_use_is_a_clear_error(server):
    with pytest.raises(DashboardError, match="cannot serve the dashboard"):
        DashboardServer(DashboardSource(Path("/nonexistent/state.db"), lambda: IDENTITY), *server.address).start()


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), (":8080", ("127.0.0.1", 8080)), ("8080", ("127.0.0.1", 8080)),
    ("0.0.0.0:0", ("0.0.0.0", 0)), ("[::1]:9000", ("::1", 9000)), ("example.org:80", ("example.org", 80)),
])
def test_dashboard_addresses(text, expected):
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:port", "1:99999", "::1:80", "a b:80", "http://x:80"])
def test_malformed_dashboard_addresses_are_refused(text):
    with pytest.raises(DashboardError):
        parse_bind(text)


def test_urls_bracket_ipv6_hosts():
    assert url_of("::1", 80) == "http://[::1]:80/" and url_of("127.0.0.1", 80) == "http://127.0.0.1:80/"


def test_the_config_refuses_a_malformed_dashboard_address(tmp_path):
    from coordinator.config import CoordinatorConfig

    assert CoordinatorConfig(dashboard=":8080").dashboard == ":8080"
    assert CoordinatorConfig().dashboard is None
    with pytest.raises(ValueError, match="not HOST:PORT"):
        CoordinatorConfig(dashboard="nope:x")


def test_a_search_before_its_first_generation_has_a_curve_without_data(tmp_path):
    from coordinator.dashboard import queries
    from coordinator.db import StateDB
    from coordinator.jobspec import CombineJob
    from umm.combine.config import CombineSettings

    db = StateDB(tmp_path / "state.db")
    n = db.start_round()
    db.create_job(n, CombineJob(models=[tmp_path / "a"], pivot=tmp_path / "a", tasks=["synth-math"], search_size=2,
                                test_size=2, device="cpu", seed=0, run_dir=tmp_path / "not-yet",
                                settings=CombineSettings()))
    c = queries.curves(db, n)
    db.close()
    assert c.fusion is None
    assert c.evolve.series == [] and c.evolve.job.status == "pending"
