"""Fixtures of the operator's integration tests: a loopback Kubernetes API and the real operator against it."""

from __future__ import annotations

import asyncio

import kmock
import pytest_asyncio

from deepseek_operator.config import OperatorConfig

from kube_harness import ApiServer, Cluster, RunningOperator, declare_resources

TEST_CONFIG = OperatorConfig(builder_image="registry.example/builder:test",
                             operator_image="registry.example/operator:test", metrics_port=0)


@pytest_asyncio.fixture()
async def cluster():
    """An emulated API server with the built-in types, the DeepSeekModel type and the 'models' namespace."""
    async with ApiServer() as server, kmock.Server(server):
        declare_resources(server)
        yield Cluster(server)


@pytest_asyncio.fixture()
async def start_operator(cluster):
    """Start the operator (call again after stopping one to simulate a restart); all are stopped at teardown."""
    running: list[RunningOperator] = []

    async def start() -> RunningOperator:
        op = RunningOperator(cluster.url, TEST_CONFIG).start()
        running.append(op)
        await cluster.wait_watching()
        return op

    yield start
    for op in running:
        await asyncio.to_thread(op.stop)  # keep this loop serving the API while kopf shuts down
