"""Serving load-test report: ``/rank`` throughput and latency per variant and concurrency, the variant the SLO logic
picks, and an overload run, each against a real ``recsys-slm serve`` (Ray Serve) subprocess on 127.0.0.1.

    .venv/bin/python -m bench.serving_report --config serving/configs/smollm2_movielens.yaml \\
        --variant teacher=runs/teacher_v2 --variant student=runs/compress/full/03_redistill \\
        --concurrency 1 4 8 --requests 16 --out docs/results/serving/report.json

Steps (every server is started with the config plus ``port``, ``retriever=null`` and a ``variants`` override, and
stopped with SIGINT, as an operator would):

1. **Per variant** (a one-variant server each): the closed-loop levels of :mod:`bench.load_rank` (``--concurrency``
   clients, ``--requests`` requests or ``--duration`` s per level, 50-candidate bodies from the prepared data),
   plus the server's start-up ``/profile``. These servers measure capacity, so they run with ``--capacity-set``
   (default: latency admission off and no candidate truncation: every request scores all its candidates and
   waits in the bounded queue instead of being shed or degraded for the SLO).
2. **SLO pick** (all variants in one server): the variant the start-up profile chooses for the config's SLO
   (``slo.p99_ms`` at ``slo.candidates`` candidates), then an **overload run**: open-loop arrivals at
   ``--overload-factor`` × the chosen variant's measured capacity (its best closed-loop requests/s in step 1) for
   ``--overload-duration`` s. Bounded queueing means: admitted requests keep p99 within the SLO, the rest get 503.
3. After each server exits: the processes left in its process group (0 = clean shutdown) and its exit code.

Output: JSON on stdout and ``--out``: ``{"machine", "config", "slo", "variants": {name: {"profile", "levels"}},
"slo_pick": {"chosen", "reason", "degrade", "profile"}, "overload": {level + "admitted_p99_within_slo"}, "shutdown": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> Any:
    import requests

    return requests.get(url, timeout=timeout).json()


class Server:
    """``recsys-slm serve`` in its own process group; ``with Server(...) as url:`` waits for ``/healthz``."""

    def __init__(self, config: Path, overrides: list[str], log: Path, start_timeout: float) -> None:
        self.port = _free_port()
        exe = Path(sys.executable).with_name("recsys-slm")
        self.cmd = [str(exe), "serve", "--config", str(config), "--port", str(self.port), *overrides]
        self.log = log
        self.start_timeout = start_timeout
        self.shutdown: dict[str, Any] = {}

    def __enter__(self) -> str:
        import requests

        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.fh = self.log.open("w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.perf_counter() + self.start_timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"recsys-slm serve exited with {self.proc.returncode} while starting; see {self.log}")
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    self.ready_s = round(time.perf_counter() - self.started, 1)
                    return url
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"recsys-slm serve not ready after {self.start_timeout} s; see {self.log}")

    def __exit__(self, *exc) -> None:
        import psutil

        pgid = self.proc.pid
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        time.sleep(3.0)  # let Ray's workers finish exiting
        left = [p.info["cmdline"][:3] for p in psutil.process_iter(["cmdline"])
                if _pgid(p.pid) == pgid]  # fmt: skip
        if code is None or left:  # never leave a stray server behind the benchmark
            os.killpg(pgid, signal.SIGKILL)
        self.fh.close()
        self.shutdown = {"cmd": " ".join(self.cmd), "exit_code": code, "processes_left": len(left),
                         "left": left[:5], "ready_s": getattr(self, "ready_s", None)}  # fmt: skip


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _variants(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=DIR`` or ``NAME=DIR@QUALITY`` (a quality for models whose manifest has none) -> (name, spec)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--variant: expected NAME=MODEL_DIR[@QUALITY], got {spec!r}")
        out.append((name, path))
    return out


def _variants_override(variants: list[tuple[str, str]]) -> str:
    items = []
    for name, spec in variants:
        path, _, quality = spec.partition("@")
        items.append(f"{{name: {name}, model: {path}" + (f", quality: {quality}}}" if quality else "}"))
    return "variants=[" + ", ".join(items) + "]"


def main(argv: list[str] | None = None) -> dict:
    from bench.load_rank import closed_loop, make_bodies, open_loop
    from recsys_slm.config import load_config
    from recsys_slm.device import machine_info
    from recsys_slm.model_dir import cache_home
    from recsys_slm.serving.config import ServingConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("serving/configs/smollm2_movielens.yaml"))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[@QUALITY]",
                        help="repeat per variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra serve overrides")
    parser.add_argument("--capacity-set", nargs="*", metavar="KEY=VALUE",
                        default=["overload.latency_admission=false", "overload.degrade_max_candidates=null"],
                        help="overrides of the per-variant (capacity) servers only")
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per closed-loop level (upper bound)")
    parser.add_argument("--duration", type=float, default=150.0, help="seconds per closed-loop level (upper bound)")
    parser.add_argument("--overload-factor", type=float, default=2.0)
    parser.add_argument("--overload-duration", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout (s)")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", type=Path, default=Path("/tmp/serving_report_logs"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = _variants(args.variant)
    if not variants:
        parser.error("give at least one --variant NAME=MODEL_DIR")

    base = ["retriever=null", *args.set]
    cfg = load_config(ServingConfig, args.config, base + [_variants_override(variants)])
    data_dir = cfg.data_dir or cache_home() / "data" / "movielens-100k"
    n_bodies = max(args.requests, 64)
    bodies = make_bodies(Path(data_dir), n_bodies, args.candidates, "rank", args.seed)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": str(args.config),
        "overrides": base,
        "capacity_overrides": args.capacity_set,
        "candidates": args.candidates,
        "slo": {"p99_ms": cfg.slo.p99_ms, "candidates": cfg.slo.candidates, "concurrency": cfg.slo.concurrency},
        "variants": {},
        "shutdown": [],
    }

    def levels_for(url: str) -> list[dict]:
        closed_loop(f"{url}/rank", bodies, 1, 2, args.duration, args.timeout)  # warm-up, unrecorded
        out = []
        for c in args.concurrency:
            level = closed_loop(f"{url}/rank", bodies, c, args.requests, args.duration, args.timeout)
            print(json.dumps(level), flush=True)
            out.append(level)
        return out

    for name, path in variants:
        print(f"[serving_report] variant {name}: {path}", flush=True)
        server = Server(args.config, base + args.capacity_set + [_variants_override([(name, path)])],
                        args.logs / f"{name}.log", args.start_timeout)  # fmt: skip
        with server as url:
            profile = _get(f"{url}/profile")
            report["variants"][name] = {"model": path.partition("@")[0], "ready_s": server.ready_s, "profile": profile,
                                        "levels": levels_for(url)}  # fmt: skip
        report["shutdown"].append({"server": name, **server.shutdown})

    print("[serving_report] all variants: SLO pick + overload", flush=True)
    server = Server(args.config, base + [_variants_override(variants)], args.logs / "slo.log", args.start_timeout)
    with server as url:
        profile = _get(f"{url}/profile")
        chosen = profile["selected"]
        capacity = max(level["throughput_rps"] or 0.0 for level in report["variants"][chosen]["levels"])
        rate = args.overload_factor * capacity
        n = max(1, int(rate * args.overload_duration))
        overload = open_loop(f"{url}/rank", bodies, rate, n, args.overload_duration, args.timeout)
        p99 = overload.get("p99_ms")
        overload.update(capacity_rps=capacity, factor=args.overload_factor,
                        admitted_p99_within_slo=(p99 is not None and p99 <= cfg.slo.p99_ms))  # fmt: skip
        report["slo_pick"] = {"chosen": chosen, "reason": profile.get("reason"),
                              "degrade": profile.get("degrade_variant"), "profile": profile}  # fmt: skip
        report["overload"] = overload
        print(json.dumps(overload), flush=True)
    report["shutdown"].append({"server": "slo", **server.shutdown})

    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    return report


if __name__ == "__main__":
    main()
