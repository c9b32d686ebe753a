"""Serving benchmark (loopback only, bounded): /predict latency, burst behaviour, predict_paths throughput.

    .venv/bin/python benchmarks/serve.py [--requests 100] [--burst 200] [--bad-share 0.2]

Uses models/champion.json when it exists, else a tiny contract-shaped model built in a temp dir.
The server runs as a subprocess on 127.0.0.1 (a free port), pinned with this process to 2 cores.
Exit status 1 when the burst saw a 5xx, a transport error or a bad input that was not a 4xx.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "code"))
from serve_support import make_tiny_champion, png_bytes_with_header, sample_pngs, sparse_png  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _configs():  # noqa: ANN202 - (DataConfig, IngestConfig)
    from medflow.config import load_params

    params = load_params(ROOT / "params.yaml")
    return params.data, params.ingest


def _serve(champion: str, port: int) -> None:
    """Subprocess entry: run the app on 127.0.0.1:port."""
    import uvicorn

    from medflow.serve.app import create_app

    data_cfg, ingest_cfg = _configs()
    uvicorn.run(create_app(Path(champion), data_cfg, ingest_cfg), host="127.0.0.1", port=port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bad_inputs(good: bytes) -> list[tuple[str, bytes]]:
    return [
        ("not_an_image", b"%PDF-1.4 not pixels\n" * 50),
        ("truncated_png", good[: len(good) // 2]),
        ("header_100000x100000", png_bytes_with_header(100_000, 100_000, zlib.compress(b"\x00" * 1000))),
        ("sparse_bomb_12000x12000", sparse_png(12_000)),
        ("empty", b""),
    ]


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _latency(base: str, images: list[bytes], n: int) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        for img in images[:5]:  # warm-up (graph tracing)
            client.post("/predict", files={"file": ("x.png", img)}).raise_for_status()
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            client.post("/predict", files={"file": ("x.png", images[i % len(images)])}).raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
    print(f"/predict single image, sequential (n={n}): p50 {_pct(times, 50):.1f} ms, p95 {_pct(times, 95):.1f} ms, "
          f"mean {statistics.mean(times):.1f} ms")


async def _burst(base: str, server: psutil.Process, images: list[bytes], n: int, bad_share: float) -> bool:
    bad = _bad_inputs(images[0])
    every = max(1, round(1 / bad_share)) if bad_share > 0 else n + 1
    plan = [(bad[(i // every) % len(bad)] if i % every == 0 else ("good", images[i % len(images)])) for i in range(n)]
    rss_before = server.memory_info().rss
    peak = rss_before
    done = asyncio.Event()

    async def sample_rss() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.memory_info().rss)
            await asyncio.sleep(0.05)

    async def one(client: httpx.AsyncClient, kind: str, body: bytes) -> tuple[str, int | str, float]:
        t0 = time.perf_counter()
        try:
            resp = await client.post("/predict", files={"file": ("upload.png", body)})
            return kind, resp.status_code, time.perf_counter() - t0
        except httpx.HTTPError as e:
            return kind, type(e).__name__, time.perf_counter() - t0

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        sampler = asyncio.create_task(sample_rss())
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, k, b) for k, b in plan))
        wall = time.perf_counter() - t0
        done.set()
        await sampler
        healthy = (await client.get("/health")).status_code == 200
    rss_after = server.memory_info().rss

    by_kind: dict[str, Counter] = {}
    for kind, status, _ in results:
        by_kind.setdefault(kind, Counter())[status] += 1
    good_lat = [t * 1000 for k, s, t in results if k == "good" and s == 200]
    n_bad = sum(1 for k, _ in plan if k != "good")
    print(f"burst: {n} concurrent /predict ({n_bad} bad = {n_bad / n:.0%}), wall {wall:.1f} s, "
          f"{n / wall:.1f} req/s")
    for kind, counts in sorted(by_kind.items()):
        print(f"  {kind:<26} {dict(sorted(counts.items(), key=str))}")
    if good_lat:
        print(f"  good-image latency under burst: p50 {_pct(good_lat, 50):.0f} ms, p95 {_pct(good_lat, 95):.0f} ms")
    mib = 1024 * 1024
    print(f"  server RSS: before {rss_before / mib:.0f} MiB, peak {peak / mib:.0f} MiB, "
          f"after {rss_after / mib:.0f} MiB; /health after burst: {'ok' if healthy else 'FAILED'}")
    server_errors = [s for _, s, _ in results if not isinstance(s, int) or s >= 500]
    bad_not_4xx = [(k, s) for k, s, _ in results if k != "good" and not (isinstance(s, int) and 400 <= s < 500)]
    good_not_ok = [s for k, s, _ in results if k == "good" and s != 200]
    ok = healthy and not server_errors and not bad_not_4xx and not good_not_ok
    print(f"  verdict: {'OK' if ok else 'FAILED'} (5xx/transport errors: {len(server_errors)}, "
          f"bad inputs without 4xx: {len(bad_not_4xx)}, good images without 200: {len(good_not_ok)})")
    return ok


def _batch_throughput(champion: Path) -> None:
    from medflow.serve.batch import predict_paths

    data_cfg, ingest_cfg = _configs()
    sample = ROOT / "data" / "raw" / "malaria-cells-400"
    with tempfile.TemporaryDirectory() as tmp:
        predict_paths([sample / "Parasitized"], Path(tmp) / "warm.csv", champion_json=champion, data_cfg=data_cfg,
                      ingest_cfg=ingest_cfg, progress=False)  # warm-up: model load, tracing
        t0 = time.perf_counter()
        summary = predict_paths([sample], Path(tmp) / "p.csv", champion_json=champion, data_cfg=data_cfg,
                                ingest_cfg=ingest_cfg, batch_size=64, progress=False)
        wall = time.perf_counter() - t0
    print(f"predict_paths: {summary['files']} files ({summary['predicted']} predicted, {summary['failed']} failed) "
          f"in {wall:.2f} s = {summary['files'] / wall:.0f} images/s (batch 64, {ingest_cfg.workers} decode threads, "
          "includes model load)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100, help="sequential single-image requests")
    ap.add_argument("--burst", type=int, default=200, help="concurrent requests in the burst")
    ap.add_argument("--bad-share", type=float, default=0.2, help="share of bad inputs in the burst")
    ap.add_argument("--serve", nargs=2, metavar=("CHAMPION", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve[0], int(args.serve[1]))
        return 0

    cores = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cores)  # the server subprocess inherits it
    with tempfile.TemporaryDirectory() as tmp:
        champion = ROOT / "models" / "champion.json"
        if not champion.is_file():
            champion = make_tiny_champion(Path(tmp))
        print(f"model: {champion} | cores: {cores} | {os.cpu_count()} CPUs on the machine")
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(champion), str(port)])
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("server did not start")
                    return 1
                time.sleep(0.25)
            print(f"server: {base}/model -> {httpx.get(f'{base}/model').json()['version']}")
            images = [f.read_bytes() for f in sample_pngs(20)]
            _latency(base, images, args.requests)
            ok = asyncio.run(_burst(base, psutil.Process(proc.pid), images, args.burst, args.bad_share))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        _batch_throughput(champion)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
