"""Fixtures for the cloud providers' tests: a service process running one provider, pointed at
a fake of that provider (tests/cloud/fakes) on 127.0.0.1.

Each provider test module starts its fake in the test process and the service under test as
its own process (`voicemesh-serve <kind> --provider <name>`), so the real servicer, the real
provider code and the real SDK run exactly as deployed, but for the endpoint.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass

import pytest

from support import START_S, Processes, free_port
from voicemesh.cli.mesh import wait_serving

# Credentials no real provider would accept: the SDKs still sign with them (SigV4, keys).
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "AKIDVOICEMESHTEST", "AWS_SECRET_ACCESS_KEY": "voicemesh-test-secret",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
             "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@dataclass
class ServiceUnderTest:
    kind: str
    address: str
    proc: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()


class ProviderServices:
    """Starts service processes with a provider and env; stops them all at teardown."""

    def __init__(self, procs: Processes):
        self.procs = procs

    def start(self, kind: str, provider: str, env: dict[str, str], name: str | None = None,
              wait: bool = True, extra: list[str] = ()) -> ServiceUnderTest:
        port = free_port()
        name = name or f"{kind}-{provider}"
        proc = self.procs.serve(kind, port, env={"VOICEMESH_LOG_FORMAT": "text", **env},
                                extra=["--provider", provider, *extra], name=name)
        service = ServiceUnderTest(kind, f"127.0.0.1:{port}", proc, str(self.procs.log_dir / f"{name}.log"))
        if wait:
            try:
                wait_serving(service.address, proc, timeout=START_S)
            except Exception as err:
                raise AssertionError(f"{name} did not become SERVING: {err}\n--- log ---\n{service.log()}") from err
        return service

    def stop(self, service: ServiceUnderTest) -> None:
        self.procs.stop(service.proc)


@pytest.fixture(scope="module")
def provider_services(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("provider-services"))
    try:
        yield ProviderServices(procs)
    finally:
        procs.stop_all()
