"""HTTPS with KServe's own flags, ``--ssl_certfile`` and ``--ssl_keyfile``: KServe's LLMInferenceService in TLS mode
mounts a certificate into the pod and its probes, gateway and endpoint picker then speak HTTPS to the server.

The server is started on a loopback port with a self-signed certificate made here; the client trusts that
certificate alone, so a reply proves the TLS handshake used it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import STARTUP_DEADLINE_S, ServerProcess, free_port
from llmisvc_checks import main_container, render, server_args
from manifest_checks import MANIFESTS


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files (what cert-manager puts in a TLS Secret)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "falcon-predictor")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def https_url(server: ServerProcess) -> str:
    return f"https://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory, start_server, tiny_dir) -> tuple[ServerProcess, ssl.SSLContext]:
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    server = start_server(tiny_dir, "--ssl_certfile", str(cert), "--ssl_keyfile", str(key), wait=False)
    trust = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:  # conftest's wait_ready speaks plain HTTP
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{https_url(server)}/health", verify=trust, timeout=2).status_code == 200:
                return server, trust
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(server.log()[-4000:])


def test_health_and_chat_over_https(tls):
    server, trust = tls
    assert httpx.get(f"{https_url(server)}/health", verify=trust, timeout=10).status_code == 200
    response = httpx.post(f"{https_url(server)}/chat", verify=trust, timeout=60,
                          json={"prompt": "Falcons", "generate_kwargs": {"do_sample": False, "max_new_tokens": 4}})
    assert response.status_code == 200 and response.json()["details"]["generated_tokens"] == [4]


def test_a_stream_over_https(tls):
    server, trust = tls
    body = {"prompt": "Falcons", "stream": True, "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "max_new_tokens": 4}}
    with httpx.stream("POST", f"{https_url(server)}/chat", json=body, verify=trust, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(item) for item in data[:-1]]
    assert "".join(e["text"] for e in events[:-1]) == events[-1]["Result"]


def test_plain_http_gets_no_answer(tls):
    server, _ = tls
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)


def test_the_llm_inference_service_preset_serves_its_alias_over_https(tmp_path, start_server, tiny_dir):
    """The preset's own command line, rendered in KServe's TLS mode, run with only the pod's paths and the port
    moved to this machine: the server answers OpenAI requests for publishers/<namespace>/models/<name> over TLS."""
    preset = yaml.safe_load((MANIFESTS / "llm-inference-service" / "preset.yaml").read_text())
    args = server_args(render(main_container(preset["spec"]), "falcon-7b", "falcon", tls=True))
    cert, key = self_signed(tmp_path)
    port = free_port()
    local = {"--model_dir": str(tiny_dir), "--http_port": str(port), "--device": "cpu",
             "--ssl_certfile": str(cert), "--ssl_keyfile": str(key)}
    moved = [f"{flag}={local[flag]}" if flag in local else arg for arg in args for flag in [arg.split("=")[0]]]
    assert sum(arg != old for arg, old in zip(moved, args)) == len(local)  # each was in the preset
    server = start_server(None, *moved, wait=False)
    trust = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            if httpx.get(f"{url}/health", verify=trust, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        raise RuntimeError(server.log()[-4000:])
    body = {"model": "publishers/falcon/models/falcon-7b", "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, verify=trust, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "falcon-7b" and response.json()["usage"]["completion_tokens"] == 3
