"""The HTTP contract of the ranking service, in-process (FastAPI TestClient, no Ray): responses, 4xx naming
the field for every kind of bad input, 503 + Retry-After when shedding, metrics, OpenAPI limits, and a bounded
hand-written fuzz (hypothesis/schemathesis are not installed) with zero 5xx."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from fastapi.testclient import TestClient

from recsys_slm.config import load_config
from recsys_slm.serving.config import ServingConfig
from recsys_slm.serving.engine import RankingEngine
from recsys_slm.serving.service import Overloaded, ServiceCore, build_app


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_data_dir):
    from serving.tiny import tiny_serving_config

    path = tiny_serving_config(tmp_path_factory.mktemp("serving_api"), tiny_data_dir)
    # generous SLO: the choice must not depend on how busy the test machine is
    eng = RankingEngine(load_config(ServingConfig, path, ["slo.p99_ms=600000", "profile.rounds=1"]))
    eng.profile()
    return eng


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(build_app(ServiceCore(engine)), raise_server_exceptions=False)


OK = {"user_id": "1", "candidates": [{"item_id": "1"}, {"item_id": "2"}, {"text": "Alien (1979), Horror"}]}


def test_rank_scores_orders_and_reports_the_variant(client, engine):
    r = client.post("/rank", json=OK)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["variant"] == engine.selected == "big" and not body["degraded"]
    assert len(body["scores"]) == len(body["logits"]) == 3 and body["candidates_scored"] == 3
    assert sorted(body["order"]) == [0, 1, 2]
    logits = body["logits"]
    assert [logits[i] for i in body["order"]] == sorted(logits, reverse=True)
    assert all(0 < s < 1 for s in body["scores"]) and body["latency_ms"] > 0 and body["history_used"] >= 1
    given = client.post("/rank", json={"profile": {"age": 30, "gender": "F", "occupation": "writer"},
                                       "history": [{"item_id": "4", "liked": True}, {"text": "Heat", "liked": False}],
                                       "candidates": [{"item_id": "5"}]})  # fmt: skip
    assert given.status_code == 200 and given.json()["history_used"] == 2


def test_same_request_same_scores(client):
    a, b = client.post("/rank", json=OK).json(), client.post("/rank", json=OK).json()
    assert a["logits"] == pytest.approx(b["logits"], abs=1e-5)


def _post(client, body, raw=False, headers=None):
    if raw:
        return client.post("/rank", content=body, headers=headers or {"content-type": "application/json"})
    return client.post("/rank", json=body)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"user_id": "1", "candidates": [', 400, "body"),
        (b"\xff\xfe not utf-8", 400, "body"),
        (b"", 422, "body"),
        (b"[1, 2]", 422, "body"),
        ({"user_id": 1, "candidates": [{"item_id": "1"}]}, 422, "user_id"),
        ({"user_id": "1", "candidates": [{"item_id": 1}]}, 422, "candidates[0].item_id"),
        ({"user_id": "1", "candidates": "1,2"}, 422, "candidates"),
        ({"user_id": "1", "candidates": []}, 422, "candidates"),
        ({"user_id": "1", "candidates": [{"item_id": "1"}] * 21}, 422, "candidates"),
        ({"user_id": "1", "candidates": [{"text": "x" * 121}]}, 422, "candidates[0].text"),
        ({"user_id": "1", "candidates": [{"text": "a\u0000b"}]}, 422, "candidates[0].text"),
        ({"user_id": "1", "candidates": [{"item_id": "1", "text": "x"}]}, 422, "candidates[0]"),
        ({"user_id": "1", "candidates": [{"item_id": "999"}]}, 422, "candidates[0].item_id"),
        ({"user_id": "ghost", "candidates": [{"item_id": "1"}]}, 422, "user_id"),
        ({"candidates": [{"item_id": "1"}]}, 422, "body"),
        ({"user_id": "1", "history": [], "candidates": [{"item_id": "1"}]}, 422, "history"),
        ({"user_id": "1", "history": [{"item_id": "1"}], "candidates": [{"item_id": "1"}]}, 422, "history[0].liked"),
        ({"user_id": "1", "history": [{"item_id": "1", "liked": "yes"}], "candidates": [{"item_id": "1"}]}, 422,
         "history[0].liked"),
        ({"user_id": "1", "model": "/etc/passwd", "candidates": [{"item_id": "1"}]}, 422, "model"),
        ({"user_id": "1", "profile": {"age": [1]}, "candidates": [{"item_id": "1"}]}, 422, "profile.age"),
        (b'{"user_id": "1", "profile": {"age": NaN}, "candidates": [{"item_id": "1"}]}', 422, "profile.age"),
        ({"user_id": "1", "candidates": [{"text": "Heat <|im_end|>"}]}, 422, "candidates[0].text"),
    ],
)  # fmt: skip
def test_bad_input_is_4xx_naming_the_field(client, body, status, field):
    r = _post(client, body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["error"] in ("invalid_request", "malformed_json")
    assert field in [d["field"] for d in payload["detail"]], payload
    assert field in payload["message"] or field == "body"


def test_body_limits_and_wrong_content_type(client):
    big = json.dumps({"user_id": "1", "candidates": [{"item_id": "1"}], "pad": "x" * 300_000})
    assert _post(client, big.encode(), raw=True).status_code == 413
    r = _post(client, json.dumps(OK).encode(), raw=True, headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500
    assert client.get("/rank").status_code == 405 and client.get("/nope").status_code == 404


def test_recommend_without_retriever_validates_then_answers_501(client):
    assert client.post("/recommend", json={"user_id": "ghost"}).status_code == 422
    assert client.post("/recommend", json={"user_id": "1", "n": 0}).status_code == 422
    r = client.post("/recommend", json={"user_id": "1", "n": 5})
    assert r.status_code == 501 and "retriever" in r.json()["message"]


@pytest.mark.parametrize("saved_index", [False, True])
def test_recommend_retrieves_unseen_items_and_reranks(engine, tiny_encoder_dir, tmp_path, saved_index):
    import copy

    from recsys_slm.serving.config import RetrieverServingConfig
    from recsys_slm.serving.recommend import Recommender

    rcfg = RetrieverServingConfig(encoder=str(tiny_encoder_dir), dim=32)
    if saved_index:  # a saved index is checked against the encoder and dimension, then used as is
        built = Recommender(rcfg, engine.log, 3.0, "cpu")
        built.index.save(tmp_path / "index")
        rcfg = RetrieverServingConfig(encoder=str(tiny_encoder_dir), dim=32, index=tmp_path / "index")
    eng = copy.copy(engine)
    eng.recommender = Recommender(rcfg, engine.log, 3.0, "cpu")
    client = TestClient(build_app(ServiceCore(eng)), raise_server_exceptions=False)
    r = client.post("/recommend", json={"user_id": "1", "n": 3, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [it["item_id"] for it in body["items"]]
    assert len(ids) == 3 and len(set(ids)) == 3 and body["retrieved"] <= 5 and body["candidates_scored"] >= 3
    assert not set(ids) & engine.seen["1"]  # never an item the user already interacted with
    logits = [it["logit"] for it in body["items"]]
    assert logits == sorted(logits, reverse=True) and body["variant"] in ("big", "small")
    assert client.post("/recommend", json={"user_id": "1", "n": 6, "k": 5}).json()["detail"][0]["field"] == "body"
    text_hist = {"profile": {"age": 30, "gender": "F", "occupation": "x"}, "history": [{"text": "Heat", "liked": True}]}
    r = client.post("/recommend", json=text_hist)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "history[0].text"
    assert client.get("/profile").json()["retriever"]["dim"] == 32


def test_health_profile_metrics_openapi(client):
    client.post("/rank", json=OK)
    client.post("/rank", json={"user_id": "ghost", "candidates": [{"item_id": "1"}]})
    assert client.get("/healthz").json()["status"] == "ok"
    prof = client.get("/profile").json()
    assert prof["selected"] == "big" and {r["name"] for r in prof["variants"]} == {"big", "small"}
    assert prof["degrade_variant"] in ("small", None) and prof["slo"]["p99_ms"] == 600000
    text = client.get("/metrics").text
    for name in ("recsys_serve_requests_total", "recsys_serve_request_latency_seconds_bucket",
                 "recsys_serve_batch_size_bucket", "recsys_serve_queue_depth", "recsys_serve_variant_selected",
                 "recsys_serve_rejections_total", "recsys_serve_variant_requests_total"):  # fmt: skip
        assert name in text, name
    assert 'recsys_serve_rejections_total{reason="invalid"}' in text
    schema = client.get("/openapi.json").json()
    cands = schema["components"]["schemas"]["RankRequest"]["properties"]["candidates"]
    assert cands["maxItems"] == 20 and cands["minItems"] == 1  # the configured limit is published
    assert "/rank" in schema["paths"] and "503" in schema["paths"]["/rank"]["post"]["responses"]


def test_overload_sheds_with_503_and_retry_after(engine):
    """Requests beyond the bounded queue are shed at once with 503 + Retry-After; the admitted ones finish."""
    gate: asyncio.Event | None = None

    async def held(job):  # a scoring backend that waits until released
        await gate.wait()
        return (await core.run_batch([job]))[0]

    core = ServiceCore(engine, score_fn=held)
    core.admission.cfg = type(core.admission.cfg)(max_queue=3, latency_admission=False)
    req = core.models["RankRequest"].model_validate(OK)

    async def scenario():
        nonlocal gate
        gate = asyncio.Event()
        tasks = [asyncio.create_task(core.rank(req)) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert core.admission.pending_requests == 3  # bounded
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert sum(isinstance(r, Overloaded) for r in results) == 2
    assert all(r.variant in ("big", "small") for r in results if not isinstance(r, Exception))
    assert core.admission.pending_requests == 0
    core.admission.pending_requests = 3  # full: the HTTP answer is a 503 with Retry-After
    r = TestClient(build_app(core)).post("/rank", json=OK)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "overloaded"


# ------------------------------------------------------------------------------------------------ fuzz
WEIRD = [None, True, False, 0, -1, 2**70, 1.5, -1e308, "", " ", "1", "999999", "x" * 5000, "é✓漢", "a\nb", "\u0000",
         "<|im_start|>", "../../etc/passwd", [], [None], {}, {"a": 1}, [[[]]], {"item_id": "1"}]  # fmt: skip


def _mutate(rng: random.Random, value, depth=0):
    """A random corruption of a valid request: replace, drop or add a field somewhere, or wrap a value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        out = dict(value)
        key = rng.choice(sorted(out))
        action = rng.random()
        if action < 0.15:
            out.pop(key)
        elif action < 0.25:
            out[rng.choice(["extra", "model_path", "__class__", key + "_"])] = rng.choice(WEIRD)
        else:
            out[key] = _mutate(rng, out[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        action = rng.random()
        if action < 0.2:
            return out * rng.choice([2, 25])
        i = rng.randrange(len(out))
        out[i] = _mutate(rng, out[i], depth + 1)
        return out
    return rng.choice(WEIRD)


def fuzz_bodies(n: int, seed: int = 0) -> list[bytes]:
    """``n`` bodies: corrupted valid requests plus raw byte oddities (truncated, deep nesting, NaN, huge)."""
    rng = random.Random(seed)
    valid = [OK, {"profile": {"age": 30, "gender": "F", "occupation": "writer"},
                  "history": [{"item_id": "4", "liked": True}, {"text": "Heat", "liked": False}],
                  "candidates": [{"item_id": "5"}, {"text": "Babe"}]}]  # fmt: skip
    raw = [b"", b"null", b"{}", b"[", b"{" * 5000 + b"}" * 5000, b"[" * 100000, b'{"user_id": "1"' + b" " * 1000,
           b'{"user_id": "1", "candidates": [{"item_id": "1"}], "user_id": 2}', b"1e999", b"NaN", b"\x00" * 64,
           json.dumps(OK).encode()[:-1]]  # fmt: skip
    bodies = list(raw)
    while len(bodies) < n:
        bodies.append(json.dumps(_mutate(rng, rng.choice(valid))).encode())
    return bodies[:n]


def test_fuzz_never_5xx(client):
    statuses = {}
    for body in fuzz_bodies(300):
        r = client.post("/rank", content=body, headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body[:200], r.text[:300])
        assert "error" in r.json() or r.status_code == 200
    assert statuses.get(200, 0) > 0 and statuses.get(422, 0) > 100, statuses
    assert client.get("/healthz").status_code == 200
