"""Control-plane benchmark: the real operator (``deepseek-operator run``, a kubeconfig) against an emulated API.

For each size N (10, 100 and 1,000 DeepSeekModels):

1. start a fresh emulated API server (kmock's, with the test harness's server-side apply, plus what load
   needs: answered requests forgotten, single-object lookups by key, watch bookmarks) and the operator as a
   subprocess of the console script, logged in through a kubeconfig;
2. create N models at a steady rate; every ``--group`` of them share their engine inputs (so one build per
   group is expected, the others wait for it);
3. play the Job controller (each build Job succeeds ``--build-seconds`` after it is created) and the
   Deployment controller (a Deployment is available as soon as it exists);
4. once all are Ready, let them sit idle for ``--idle-seconds`` and count the API requests and the operator's
   CPU time meanwhile; read its RSS at the end.

Reported per size: create -> build decided (the model's status names the Job that builds its engine, its own
or the one it waits for) p50/p99; Job succeeded -> Ready p50/p99; idle RSS; API requests per idle model per
minute; CPU seconds per idle minute; build Jobs per distinct engine key.

    python bench/operator/run.py                       # 10, 100, 1000
    python bench/operator/run.py --sizes 10 100 --idle-seconds 20

Writes bench/results/operator.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import aiohttp
import kmock
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the emulator with server-side apply lives there

from kmock._internal.k8s import KubernetesScaffold  # noqa: E402
from kube_harness import ApiServer, declare_resources  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "operator.json"
NAMESPACE = "models"
CR_PATH = f"/apis/deepseek.ai/v1alpha1/namespaces/{NAMESPACE}/deepseekmodels"
#: A real API server sends a bookmark about once a minute; kopf reconnects a watch after 70 s without events.
BOOKMARK_SECONDS = 20.0


def spec_for(group: int) -> dict:
    """Models of one group share their engine inputs; groups differ by revision."""
    return {
        "model": {"source": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "revision": f"rev-{group:04d}"},
        "engine": {"backend": "onnxruntime", "precision": "fp32", "maxBatchSize": 4},
        "serving": {"gpusPerReplica": 0, "replicas": 1},
    }


class DirectRouting(KubernetesScaffold):
    """kmock routes every request through each of its ~100 reactions (discovery, fallbacks) until one matches:
    about a millisecond a request.  Answer the object verbs straight from the emulator's own handlers instead
    (the same answers; watches, lists and discovery still take kmock's way)."""

    async def _handle(self, request):  # type: ignore[override]
        serve = {
            kmock.action.FETCH: "_serve_fetch", kmock.action.CREATE: "_serve_create",
            kmock.action.UPDATE: "_serve_update", kmock.action.DELETE: "_serve_delete",
        }.get(request.action)
        if serve is None or request.resource is None or (request.name is None and request.action !=
                                                          kmock.action.CREATE):
            return await super()._handle(request)
        payload = await getattr(self, serve)(request)
        return aiohttp.web.json_response(payload, status=201 if request.action == kmock.action.CREATE else 200)


class LoadApiServer(ApiServer, DirectRouting):
    """The harness's emulator, made for load: lookups by key, bookmarks, and the clocks the bench reads."""

    def _KubernetesEmulator__get_obj(self, request, strict):  # kmock's private scan over every object
        if strict and request.name is not None:
            return self._objects._objects.get((request.resource, request.namespace, request.name))
        return super()._KubernetesEmulator__get_obj(request, strict)

    def start_clocks(self) -> None:
        self.created: dict[str, float] = {}
        self.phases: dict[str, dict[str, float]] = {}
        self.building: dict[str, float] = {}
        self.jobs: dict[str, tuple[float, str]] = {}  # name -> (created at, engine key)
        self.requests: list[tuple[float, str, str]] = []  # (time, verb, resource plural), watches excluded
        self.available_tasks: set = set()
        self.server_cpu = 0.0  # CPU seconds the emulator spent answering (its process is not the operator's)

    async def _handle(self, request):  # type: ignore[override]
        now = time.monotonic()
        plural = request.resource.plural if request.resource is not None else ""
        if request.action is not None and request.action != kmock.action.WATCH:
            self.requests.append((now, str(request.method), plural))
        data = request.data if isinstance(request.data, dict) else {}
        if plural == "deepseekmodels" and request.subresource == "status":
            status = data.get("status") or {}
            phase = status.get("phase")
            if phase:
                self.phases.setdefault(request.name, {}).setdefault(phase, now)
            built = next((c for c in status.get("conditions") or [] if c.get("type") == "EngineBuilt"), {})
            if built.get("reason") in ("BuildRunning", "WaitingForBuild"):
                self.building.setdefault(request.name, now)
        elif plural == "jobs" and request.action == kmock.action.CREATE:
            meta = data.get("metadata") or {}
            self.jobs.setdefault(meta.get("name"), (now, (meta.get("labels") or {}).get("deepseek.ai/engine-key")))
        started = time.process_time()
        response = await super()._handle(request)
        if request.action != kmock.action.WATCH:
            self.server_cpu += time.process_time() - started
        if (plural == "deployments" and request.subresource is None and request.name is not None
                and request.action in (kmock.action.UPDATE, kmock.action.CREATE)):
            task = asyncio.create_task(self._make_available(request.name))
            self.available_tasks.add(task)
            task.add_done_callback(self.available_tasks.discard)
        return response

    async def _make_available(self, name: str) -> None:
        """The Deployment controller: the current template's replicas are up."""
        key = (kmock.resource("apps", "v1", "deployments"), NAMESPACE, name)
        obj = self._objects._objects.get(key)
        if obj is None or obj.deleted:
            return
        raw = obj.raw
        status = raw.get("status") or {}
        generation = raw["metadata"].get("generation", 1)
        if status.get("observedGeneration") == generation and status.get("availableReplicas"):
            return
        replicas = (raw.get("spec") or {}).get("replicas", 1)
        await self.session.patch(
            f"{self.base}/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}/status",
            json={"status": {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                             "readyReplicas": replicas, "availableReplicas": replicas}},
            headers={"Content-Type": "application/merge-patch+json"})

    async def bookmarks(self) -> None:
        """What a real API server sends on a quiet watch, so a client's watch stays open."""
        version = 10**9
        while True:
            await asyncio.sleep(BOOKMARK_SECONDS)
            for resource, bus in list(self._buses.items()):
                version += 1
                await bus.put({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(version)}}})


def kubeconfig(path: Path, url: str) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": url}}],
        "users": [{"name": "bench", "user": {"token": "bench"}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
    }))


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MB) of a process from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return cpu, rss


def pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


async def run_size(n: int, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    async with LoadApiServer() as server, kmock.Server(server):
        declare_resources(server)
        server.start_clocks()
        server.base = str(server.url).rstrip("/")
        server.session = aiohttp.ClientSession()
        bookmarks = asyncio.create_task(server.bookmarks())
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "kubeconfig"
            kubeconfig(config, server.base)
            env = {**os.environ, "KUBECONFIG": str(config), "WATCH_NAMESPACES": ""}
            code = "from deepseek_cli import main; main(prog_name='deepseek-operator')"
            proc = subprocess.Popen([sys.executable, "-c", code, "run", "--all-namespaces", "--metrics-port", "0"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                return await measure(server, proc, n, args)
            finally:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, 20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                bookmarks.cancel()
                for task in list(server.available_tasks):
                    task.cancel()
                await server.session.close()


async def measure(server: LoadApiServer, proc: subprocess.Popen, n: int, args: argparse.Namespace) -> dict:
    cr_watch = kmock.resource("deepseek.ai", "v1alpha1", "deepseekmodels")
    await wait_until(lambda: len(server[kmock.action.WATCH, cr_watch]) > 0, 60, "the operator's watch")
    started_at = time.monotonic()
    operator_cpu_start, _ = proc_stats(proc.pid)
    names = [f"m{i:04d}" for i in range(n)]
    groups = {name: i // args.group for i, name in enumerate(names)}

    async def finish_jobs() -> None:
        """The Job controller: each build Job succeeds --build-seconds after it was created."""
        done: set[str] = set()
        while len(done) < len(set(groups.values())) or len(done) < len(server.jobs):
            for job, (created, _) in list(server.jobs.items()):
                if job not in done and time.monotonic() - created >= args.build_seconds:
                    done.add(job)
                    server.job_done[job] = time.monotonic()
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    await server.session.patch(
                        f"{server.base}/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job}/status",
                        json={"status": {"startTime": stamp, "completionTime": stamp, "succeeded": 1,
                                         "conditions": [{"type": "Complete", "status": "True"}]}},
                        headers={"Content-Type": "application/merge-patch+json"})
            await asyncio.sleep(0.05)

    server.job_done = {}
    jobs_task = asyncio.create_task(finish_jobs())
    interval = 1.0 / args.rate
    for i, name in enumerate(names):
        target = started_at + i * interval
        await asyncio.sleep(max(0.0, target - time.monotonic()))
        server.created[name] = time.monotonic()
        body = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel",
                "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec_for(groups[name])}
        async with server.session.post(f"{server.base}{CR_PATH}", json=body) as rsp:
            assert rsp.status < 300, await rsp.text()
    timeout = 120 + n * 0.3
    await wait_until(lambda: all("Ready" in server.phases.get(m, {}) for m in names), timeout, f"{n} models Ready")
    jobs_task.cancel()
    ready_at = time.monotonic()
    to_ready = [r for r in server.requests if started_at <= r[0] <= ready_at]
    operator_cpu_to_ready = proc_stats(proc.pid)[0] - operator_cpu_start

    await asyncio.sleep(args.settle_seconds)
    cpu0, _ = proc_stats(proc.pid)
    t0 = time.monotonic()
    await asyncio.sleep(args.idle_seconds)
    t1 = time.monotonic()
    cpu1, rss = proc_stats(proc.pid)
    idle_requests = [r for r in server.requests if t0 <= r[0] < t1]
    minutes = (t1 - t0) / 60

    # Job succeeded -> Ready: the Job that built the model's engine (its own or the one it waited for).
    job_of_group: dict[int, str] = {}
    for job, (_, key) in server.jobs.items():
        owner = job.split("-build-")[0]
        job_of_group.setdefault(groups.get(owner, -1), job)
    create_to_build = [server.building[m] - server.created[m] for m in names if m in server.building]
    job_to_ready = []
    for m in names:
        job = job_of_group.get(groups[m])
        done = server.job_done.get(job)
        if done is not None:
            job_to_ready.append(server.phases[m]["Ready"] - done)
    keys = len(set(groups.values()))
    row = {
        "models": n,
        "distinct_engine_keys": keys,
        "create_rate_per_s": args.rate,
        "create_to_build_p50_s": pct(create_to_build, 0.5),
        "create_to_build_p99_s": pct(create_to_build, 0.99),
        "job_succeeded_to_ready_p50_s": pct(job_to_ready, 0.5),
        "job_succeeded_to_ready_p99_s": pct(job_to_ready, 0.99),
        "all_ready_after_s": ready_at - started_at,
        "requests_per_model_to_ready": len(to_ready) / n,
        "requests_to_ready_by_verb": _by_verb(to_ready),
        "emulator_cpu_s": server.server_cpu,
        "operator_cpu_s_to_ready": operator_cpu_to_ready,
        "idle_seconds": t1 - t0,
        "idle_rss_mb": rss,
        "idle_requests": len(idle_requests),
        "idle_requests_by_verb": _by_verb(idle_requests),
        "requests_per_idle_model_per_minute": len(idle_requests) / n / minutes,
        "cpu_seconds_per_idle_minute": (cpu1 - cpu0) / minutes,
        "build_jobs": len(server.jobs),
        "build_jobs_per_engine_key": len(server.jobs) / keys,
    }
    return row


def _by_verb(requests: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, verb, plural in requests:
        out[f"{verb} {plural}"] = out.get(f"{verb} {plural}", 0) + 1
    return out


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| models | create -> build p50 / p99 | Job done -> Ready p50 / p99 | idle RSS | requests per idle model "
        "per minute | CPU s per idle minute | build Jobs per engine key |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['models']:,} | {fmt(r['create_to_build_p50_s'])} s / {fmt(r['create_to_build_p99_s'])} s "
            f"| {fmt(r['job_succeeded_to_ready_p50_s'])} s / {fmt(r['job_succeeded_to_ready_p99_s'])} s "
            f"| {r['idle_rss_mb']:.0f} MB | {r['requests_per_idle_model_per_minute']:.3f} "
            f"| {r['cpu_seconds_per_idle_minute']:.2f} | {r['build_jobs_per_engine_key']:.2f} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[dict]:
    rows = []
    log_path = Path(tempfile.gettempdir()) / "deepseek-bench-operator.log"
    print(f"bench/operator: the operator's log is {log_path}", flush=True)
    with open(log_path, "w") as log:
        for n in args.sizes:
            print(f"bench/operator: {n} models ...", flush=True)
            row = await run_size(n, args, log)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rate", type=float, default=20.0, help="models created per second")
    parser.add_argument("--group", type=int, default=4, help="models per distinct engine key")
    parser.add_argument("--build-seconds", type=float, default=5.0, help="how long each build Job runs")
    parser.add_argument("--settle-seconds", type=float, default=5.0, help="wait after all are Ready")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window measured")
    args = parser.parse_args(argv)
    rows = asyncio.run(main_async(args))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "operator control plane against the emulated API (kmock + server-side apply)",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items()},
        "rows": rows,
    }, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
