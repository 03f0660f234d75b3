"""End to end on Ray Serve: ``recsys-slm serve`` on a free port → /healthz, /rank (batched), /profile, /metrics,
bad inputs 4xx, a bounded fuzz with zero 5xx, then SIGINT → clean exit with no process left behind.
About a minute: one local Ray node, two tiny models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    import psutil
    import requests

    from serving.tiny import tiny_serving_config

    tmp = tmp_path_factory.mktemp("serving_ray")
    port = _free_port()
    config = tiny_serving_config(tmp, tiny_data_dir, port=port, slo={"p99_ms": 600000, "candidates": 8, "concurrency": 2},
                                 batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
                                 retriever={"encoder": str(tiny_encoder_dir)})  # fmt: skip
    log = open(tmp / "serve.log", "w")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "recsys_slm.cli", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        if "ready on" in (tmp / "serve.log").read_text():
            break
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("serve did not become ready in 300 s:\n" + (tmp / "serve.log").read_text()[-3000:])
    state = {"proc": proc, "base": base, "log": tmp / "serve.log", "requests": requests,
             "children": psutil.Process(proc.pid).children(recursive=True)}  # fmt: skip
    yield state
    if proc.poll() is None:  # a failed test left it running: stop it the same way
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_health_profile_and_rank(server):
    rq, base = server["requests"], server["base"]
    assert rq.get(f"{base}/healthz", timeout=10).json()["status"] == "ok"
    prof = rq.get(f"{base}/profile", timeout=10).json()
    assert prof["selected"] == "big" and all(r["p99_ms"] is not None for r in prof["variants"])
    body = {"user_id": "2", "candidates": [{"item_id": str(i)} for i in range(6)]}
    r = rq.post(f"{base}/rank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["variant"] == "big" and sorted(out["order"]) == list(range(6)) and out["latency_ms"] > 0


def test_concurrent_requests_are_batched(server):
    rq, base = server["requests"], server["base"]
    body = {"user_id": "3", "candidates": [{"item_id": str(i)} for i in range(8)]}
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: rq.post(f"{base}/rank", json=body, timeout=120).status_code, range(16)))
    assert codes == [200] * 16
    metrics = rq.get(f"{base}/metrics", timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith("recsys_serve_batch_size_")}  # fmt: skip
    assert values["recsys_serve_batch_size_sum"] > values["recsys_serve_batch_size_count"]  # some batch held > 1
    assert 'recsys_serve_variant_requests_total{degraded="false",variant="big"}' in metrics


def test_bad_inputs_and_fuzz_over_http_never_5xx(server):
    from tests.unit.test_serving_api import fuzz_bodies

    rq, base = server["requests"], server["base"]
    r = rq.post(f"{base}/rank", data=b'{"user_id": ', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["detail"][0]["field"] == "body"
    r = rq.post(f"{base}/rank", json={"user_id": "1", "candidates": [{"item_id": "nope"}]}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "candidates[0].item_id"
    statuses = {}
    for body in fuzz_bodies(60, seed=1):
        r = rq.post(f"{base}/rank", data=body, headers={"content-type": "application/json"}, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body[:200], r.text[:300])
    assert rq.get(f"{base}/healthz", timeout=10).status_code == 200, statuses


def test_recommend_end_to_end(server):
    rq, base = server["requests"], server["base"]
    r = rq.post(f"{base}/recommend", json={"user_id": "1", "n": 3, "k": 6}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 3 and body["retrieved"] == 4  # 16 items, 12 seen by user 1


def test_load_generator_is_bounded_and_reports_percentiles(server, tiny_data_dir, tmp_path):
    from bench.load_rank import main

    start = time.time()
    report = main(["--url", server["base"], "--data-dir", str(tiny_data_dir), "--candidates", "4",
                   "--concurrency", "1", "3", "--rate", "20", "--requests", "6", "--duration", "30",
                   "--warmup", "1", "--out", str(tmp_path / "load.json")])  # fmt: skip
    assert time.time() - start < 120
    assert json.loads((tmp_path / "load.json").read_text()) == report
    closed1, closed3, open20 = report["levels"]
    assert (closed1["concurrency"], closed3["concurrency"], open20["rate"]) == (1, 3, 20.0)
    for level in report["levels"]:
        assert level["sent"] == 6 and level["ok"] + sum(level["errors_by_status"].values()) == 6
        assert level["ok"] == 0 or level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
        assert level["ok"] == 6 or set(level["errors_by_status"]) <= {"503"}


def test_sigint_shuts_down_cleanly(server):
    proc = server["proc"]
    children = server["children"]
    assert children, "serve started no Ray processes?"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0, server["log"].read_text()[-2000:]
    deadline = time.time() + 20
    alive = children
    while time.time() < deadline:
        alive = [c for c in children if c.is_running() and c.status() != "zombie"]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, [(c.pid, c.name()) for c in alive]
    assert "stopped" in server["log"].read_text()
    with pytest.raises(server["requests"].ConnectionError):
        server["requests"].get(f"{server['base']}/healthz", timeout=5)
