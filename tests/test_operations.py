"""Running it in production: the operator flags TEI and vLLM users rely on, each against a live `toolkit serve`
(CORS, TLS, OTLP spans, JSON logs, auto-truncate, default prompts, a Unix socket, a metrics port; environment
variables in TEI's and the TOOLKIT_ form)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from conftest import free_port, serve_subprocess

KEY = "s3cret"
ORIGIN = "https://app.example"
AUTH = {"Authorization": f"Bearer {KEY}"}


class _Receiver(BaseHTTPRequestHandler):
    """A local OTLP/HTTP receiver: decodes every ExportTraceServiceRequest it is sent."""

    spans: list = []

    def do_POST(self):  # noqa: N802 - http.server's hook
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    _Receiver.spans.append({"name": span.name, "trace_id": span.trace_id.hex(),
                                            "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                            "service": service, "start": span.start_time_unix_nano,
                                            "end": span.end_time_unix_nano,
                                            "attributes": {a.key: a.value for a in span.attributes}})
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def live(tiny_artifact, receiver, tmp_path_factory):
    """One server with every operator flag; its log lines go to a file (read by the JSON test)."""
    folder = tmp_path_factory.mktemp("operations")
    socket_path, metrics_port = folder / "toolkit.sock", free_port()
    log = open(folder / "server.log", "w")
    url, port, proc = serve_subprocess(
        tiny_artifact, "--api-key", KEY, "--cors-allow-origin", ORIGIN, "--log-level", "info", "--json-output",
        "--uds-path", str(socket_path), "--otlp-endpoint", receiver, "--otlp-service-name", "embedder-under-test",
        env={"TOOLKIT_AUTO_TRUNCATE": "true", "DEFAULT_PROMPT_NAME": "query", "PROMETHEUS_PORT": str(metrics_port)},
        ready="/health", output=log)
    yield {"url": url, "socket": socket_path, "metrics": f"http://127.0.0.1:{metrics_port}", "proc": proc,
           "log": folder / "server.log"}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_cors_answers_allowed_origins_only(live):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(live["url"] + "/v1/embeddings", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 204, allowed.text  # no API key on a preflight: browsers send none
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    refused = httpx.options(live["url"] + "/v1/embeddings", headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    r = httpx.post(live["url"] + "/v1/embeddings", json={"input": "hi"}, headers={"Origin": ORIGIN, **AUTH})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = httpx.post(live["url"] + "/v1/embeddings", json={"input": "hi"}, headers={"Origin": "https://evil.example", **AUTH})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # the browser will block it
    for odd in ({"Access-Control-Request-Method": "BREW" * 500}, {"Access-Control-Request-Headers": ",,," + "x" * 8000},
                {"Access-Control-Request-Method": ""}):
        r = httpx.options(live["url"] + "/v1/embeddings", headers={"Origin": ORIGIN, **odd})
        assert r.status_code < 500, r.text
    assert httpx.get(live["url"] + "/health").status_code == 200


def test_a_unix_socket_serves_the_same_api(live):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(live["socket"])), base_url="http://toolkit") as client:
        r = client.post("/v1/embeddings", json={"input": ["a", "b"]}, headers=AUTH)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 401  # the key holds there too


def test_metrics_on_their_own_port(live):
    r = httpx.get(live["metrics"] + "/metrics")
    assert r.status_code == 200 and "toolkit_requests_total" in r.text
    assert httpx.get(live["url"] + "/metrics").status_code == 401  # behind the key on the API port
    assert httpx.get(live["url"] + "/metrics", headers=AUTH).status_code == 200
    other = httpx.get(live["metrics"] + "/v1/models")
    assert other.status_code == 404 and "serves /metrics only" in other.json()["error"]["message"]
    schema = httpx.get(live["url"] + "/openapi.json").json()["paths"]["/metrics"]["get"]
    assert schema["security"] == [{"BearerAuth": []}] and "--prometheus-port" in schema["description"]


def test_auto_truncate_and_the_default_prompt(live, tiny):
    long_text = "word " * 400
    r = httpx.post(live["url"] + "/v1/embeddings", json={"input": long_text}, headers=AUTH)
    assert r.status_code == 200, r.text  # cut to the window instead of a 400
    expected = tiny.embed(long_text, truncate_prompt_tokens=-1, prompt_name="query")[0]
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected, atol=1e-5)
    assert r.json()["usage"]["prompt_tokens"] == tiny.manifest.max_seq_len
    # the request says otherwise: TEI's truncate false, Cohere's NONE
    assert httpx.post(live["url"] + "/embed", json={"inputs": long_text, "truncate": False}, headers=AUTH).status_code == 413
    assert httpx.post(live["url"] + "/v2/embed", json={"texts": [long_text], "truncate": "NONE"},
                      headers=AUTH).status_code == 400
    info = httpx.get(live["url"] + "/info", headers=AUTH).json()
    assert info["auto_truncate"] is True
    # the default prompt changes the vector exactly as the explicit prompt does; an explicit one still wins
    plain = httpx.post(live["url"] + "/v1/embeddings", json={"input": "hello there"}, headers=AUTH).json()
    np.testing.assert_allclose(plain["data"][0]["embedding"], tiny.embed("hello there", prompt_name="query")[0], atol=1e-5)
    other = httpx.post(live["url"] + "/embed", json={"inputs": "hello there", "prompt_name": "document"}, headers=AUTH)
    np.testing.assert_allclose(other.json()[0], tiny.embed("hello there", prompt_name="document")[0], atol=1e-5)


def _wait_for(predicate, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail("the spans did not arrive")


def test_spans_reach_the_otlp_receiver_with_the_callers_parent(live):
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = httpx.post(live["url"] + "/v1/embeddings", json={"input": ["one", "two"]},
                   headers={**AUTH, "traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    root = _wait_for(lambda: next((s for s in _Receiver.spans if s["trace_id"] == trace_id and s["parent"] == parent),
                                  None))
    assert root["name"] == "POST /v1/embeddings" and root["service"] == "embedder-under-test"
    assert root["attributes"]["toolkit.request_id"].string_value == "req-42"
    assert root["attributes"]["http.response.status_code"].int_value == 200
    children = _wait_for(lambda: [s for s in _Receiver.spans if s["parent"] == root["span_id"]])
    names = {s["name"] for s in children}
    assert {"queue", "inference", "encode"} <= names, names
    for child in children:
        assert child["trace_id"] == trace_id and root["start"] <= child["start"] <= child["end"] <= root["end"]
    # a malformed traceparent is ignored: the request is served and starts a trace of its own
    count = len(_Receiver.spans)
    r = httpx.post(live["url"] + "/v1/embeddings", json={"input": "x"},
                   headers={**AUTH, "traceparent": "00-zz-not-a-trace-99", "x-request-id": "req-43"})
    assert r.status_code == 200
    fresh = _wait_for(lambda: next((s for s in _Receiver.spans[count:]
                                    if s["attributes"].get("toolkit.request_id")
                                    and s["attributes"]["toolkit.request_id"].string_value == "req-43"), None))
    assert fresh["parent"] == "" and len(fresh["trace_id"]) == 32


def test_every_log_line_is_json(live):
    httpx.post(live["url"] + "/v1/embeddings", json={"input": "x"}, headers={**AUTH, "x-request-id": "json-line"})
    httpx.post(live["url"] + "/v1/embeddings", content=b"{not json", headers=AUTH)  # a 4xx is logged the same way
    deadline = time.monotonic() + 10
    while "json-line" not in live["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in live["log"].read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line parses
    assert all({"timestamp", "level", "target", "message"} <= set(e) for e in entries)
    access = next(e for e in entries if e.get("request_id") == "json-line")
    assert access["route"] == "/v1/embeddings" and access["status"] == 200 and access["tokens"] > 0
    assert access["latency_ms"] > 0 and len(access["trace_id"]) == 32  # tracing is on: the ids join the line
    assert any(e.get("status") == 400 for e in entries)


def _openssl_pair(folder):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to test TLS with")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_https_with_the_openai_client(tiny_artifact, tiny, tmp_path):
    import openai

    key, cert = _openssl_pair(tmp_path)
    url, _, proc = serve_subprocess(tiny_artifact, "--served-model-name", "tiny",
                                    env={"TOOLKIT_SSL_KEYFILE": str(key), "SSL_CERTFILE": str(cert)},
                                    tls_ca=cert)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", http_client=httpx.Client(verify=str(cert)))
        vectors = client.embeddings.create(model="tiny", input=["hello there"])
        np.testing.assert_allclose(vectors.data[0].embedding, tiny.embed("hello there")[0], atol=1e-5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http") + "/health", timeout=3)  # plain HTTP is not spoken
        proc.terminate()  # with the client's idle TLS connection still open: it must not hold the shutdown
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


@pytest.mark.parametrize(("args", "message"), [
    (["--ssl-keyfile", "/nonexistent/key.pem", "--ssl-certfile", "/nonexistent/cert.pem"], "--ssl-keyfile /nonexistent/key.pem: no such file"),
    (["--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile go together"),
    (["--otlp-endpoint", "localhost:4318"], "--otlp-endpoint must be an http(s) URL"),
    (["--auto-truncate", "--max-embed-len", "4096"], "--auto-truncate and --max-embed-len"),
    (["--default-prompt-name", "nope"], "default prompt name 'nope' is not one of this model's prompts: query, document"),
    (["--allowed-origins", "[not json"], "is not a JSON list of origins"),
    (["--chat-template", "no/such/template.jinja"], "--chat-template: no file 'no/such/template.jinja'"),
    (["--chat-template", "{% for m in messages %}"], "--chat-template: chat template does not compile"),
])
def test_bad_operator_flags_are_one_line(tiny_artifact, args, message):
    result = subprocess.run([sys.executable, "-m", "toolkit.cli", "serve", str(tiny_artifact), "--port",
                             str(free_port()), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_unreadable_certificate_is_one_line(tiny_artifact, tmp_path):
    (tmp_path / "key.pem").write_text("not a key")
    (tmp_path / "cert.pem").write_text("not a certificate")
    result = subprocess.run([sys.executable, "-m", "toolkit.cli", "serve", str(tiny_artifact), "--ssl-keyfile",
                             str(tmp_path / "key.pem"), "--ssl-certfile", str(tmp_path / "cert.pem")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cannot use the TLS key and certificate" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_same_defaults_in_the_python_api(tiny_artifact, tiny):
    from toolkit.errors import ConfigError, InputTooLongError
    from toolkit.runtime import Embedder

    long_text = "word " * 400
    with pytest.raises(InputTooLongError):
        tiny.embed(long_text)
    cut = Embedder(tiny_artifact, device="cpu", auto_truncate=True)
    np.testing.assert_allclose(cut.embed(long_text), tiny.embed(long_text, truncate_prompt_tokens=-1), atol=1e-6)
    with pytest.raises(InputTooLongError):
        cut.embed(long_text, truncate_prompt_tokens=False)  # the call refuses truncation
    prompted = Embedder(tiny_artifact, device="cpu", default_prompt="query: ")
    np.testing.assert_allclose(prompted.embed("hi"), tiny.embed("hi", prompt_name="query"), atol=1e-6)
    np.testing.assert_allclose(prompted.embed("hi", prompt=""), tiny.embed("hi", prompt=""), atol=1e-6)
    with pytest.raises(ConfigError, match="not both"):
        Embedder(tiny_artifact, device="cpu", default_prompt="x", default_prompt_name="query")


def test_tracing_without_the_otel_extra_is_one_line(tiny_artifact):
    """A serving install without [otel] (simulated: its modules cannot be imported) names the extra."""
    script = ("import sys; sys.modules['opentelemetry'] = None; from toolkit.cli import main; "
              "sys.argv = ['toolkit', *sys.argv[1:]]; main()")
    result = subprocess.run([sys.executable, "-c", script, "serve", str(tiny_artifact), "--port", str(free_port()),
                             "--otlp-endpoint", "http://127.0.0.1:4318"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "[otel]" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


SERVER_TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
CONVERSATION = [{"role": "system", "content": "Embed this."}, {"role": "user", "content": "What is ONNX?"}]


@pytest.mark.anyio
async def test_the_servers_chat_template(tiny_artifact, tiny, tiny_decoder_artifact, tmp_path):
    """vLLM's --chat-template: it renders messages for a model without a template, and replaces a model's own;
    /tokenizer_info reports it; a request's own template still needs --allow-request-chat-template."""
    from conftest import async_app_client

    from toolkit.runtime import Embedder

    (tmp_path / "t.jinja").write_text(SERVER_TEMPLATE)
    from toolkit.runtime.chat import load_template

    assert load_template(str(tmp_path / "t.jinja")) == SERVER_TEMPLATE == load_template(SERVER_TEMPLATE)
    decoder = Embedder(tiny_decoder_artifact, device="cpu")
    for artifact, emb in ((tiny_artifact, tiny), (tiny_decoder_artifact, decoder)):
        async with async_app_client(artifact, ["m"], chat_template=SERVER_TEMPLATE) as client:
            r = await client.post("/v1/embeddings", json={"messages": CONVERSATION})
            assert r.status_code == 200, r.text
            text = emb.render_chat(CONVERSATION, chat_template=SERVER_TEMPLATE)
            assert text == "<system> Embed this.\n<user> What is ONNX?\n"
            np.testing.assert_allclose(r.json()["data"][0]["embedding"],
                                       emb.embed(text, add_special_tokens=False)[0], atol=1e-5)
            r = await client.post("/tokenize", json={"messages": CONVERSATION})
            assert r.json()["tokens"] == emb.tokenize(text, add_special_tokens=False)
            assert (await client.get("/tokenizer_info")).json()["chat_template"] == SERVER_TEMPLATE
            r = await client.post("/v1/embeddings", json={"messages": CONVERSATION, "chat_template": "{{ 1 }}"})
            assert r.status_code == 400 and "--allow-request-chat-template" in r.json()["error"]["message"]
    async with async_app_client(tiny_decoder_artifact, ["m"]) as client:  # without the flag: the model's own
        r = await client.post("/tokenize", json={"messages": CONVERSATION})
        own = decoder.render_chat(CONVERSATION)
        assert own != decoder.render_chat(CONVERSATION, chat_template=SERVER_TEMPLATE)
        assert r.json()["tokens"] == decoder.tokenize(own, add_special_tokens=False)
