"""The test harness itself runs real services: mosquitto (plain and TLS + ACL), the HTTP artifact
server with Range and faults, and the real GGUF models in llama-cpp-python."""

from __future__ import annotations

import hashlib
import queue
import socket
import ssl
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.topics import Topics, render_mosquitto_acl
from tests.harness.artifact_server import Fault
from tests.harness.broker import Mosquitto

TOPICS = Topics("lab")


def connect(
    broker: Mosquitto, client_id: str, cert=None, will: tuple[str, bytes] | None = None
) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if cert is not None:
        client.tls_set(ca_certs=str(broker.tls.ca.ca_file), certfile=str(cert.cert), keyfile=str(cert.key))
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.connect(broker.host, broker.port, keepalive=5)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{client_id} did not connect")
        time.sleep(0.02)
    return client


def collector(client: mqtt.Client, topic: str) -> queue.Queue:
    received: queue.Queue = queue.Queue()
    client.on_message = lambda _c, _u, msg: received.put(msg)
    done: queue.Queue = queue.Queue()
    client.on_subscribe = lambda *args: done.put(True)
    client.subscribe(topic, qos=1)
    done.get(timeout=5)
    return received


def test_plain_broker_delivers_retained_desired_state_and_last_will(mqtt_broker: Mosquitto) -> None:
    publisher = connect(mqtt_broker, "trainer")
    publisher.publish(TOPICS.desired_fleet(), b'{"envelope":1}', qos=1, retain=True).wait_for_publish(5)
    device = connect(mqtt_broker, "pi-01", will=(TOPICS.status("pi-01"), b"offline"))
    watcher = connect(mqtt_broker, "watcher")
    statuses = collector(watcher, TOPICS.status("pi-01"))
    retained = collector(connect(mqtt_broker, "late-joiner"), TOPICS.desired_fleet())
    message = retained.get(timeout=5)
    assert message.retain and message.payload == b'{"envelope":1}'
    device._sock.close()  # die without DISCONNECT: the broker must publish the Last Will
    device.loop_stop()
    assert statuses.get(timeout=15).payload == b"offline"


def test_mqtt5_request_response_properties_pass_through(mqtt_broker: Mosquitto) -> None:
    device = connect(mqtt_broker, "pi-01")
    requests = collector(device, TOPICS.command("pi-01"))
    operator = connect(mqtt_broker, "alice")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = TOPICS.response("alice")
    props.CorrelationData = b"req-42"
    props.MessageExpiryInterval = 60
    operator.publish(TOPICS.command("pi-01"), b"{}", qos=1, properties=props).wait_for_publish(5)
    received = requests.get(timeout=5).properties
    assert received.ResponseTopic == TOPICS.response("alice")
    assert received.CorrelationData == b"req-42"
    assert 0 < received.MessageExpiryInterval <= 60


def _tls_first_read(broker: Mosquitto, cert=None) -> BaseException:
    """Open TLS to the broker (with or without a client certificate), send the start of an MQTT
    CONNECT and read: what that read raised (a broker waiting for the rest times out)."""
    context = ssl.create_default_context(cafile=str(broker.tls.ca.ca_file))
    context.check_hostname = False  # the point here is the client certificate, not the name
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    with socket.create_connection((broker.host, broker.port), timeout=2) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"\x10")  # the first byte of an MQTT CONNECT
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            return exc
    raise AssertionError("the broker answered half a CONNECT")


def test_tls_broker_requires_a_client_certificate(tls_broker_factory) -> None:
    broker = tls_broker_factory(None)
    # Control: with a certificate the TLS session stands and the broker waits for the rest of the
    # CONNECT (the read times out); a real client with one connects.
    assert isinstance(_tls_first_read(broker, broker.tls.client("control")), TimeoutError)
    control = connect(broker, "control", cert=broker.tls.client("control"))
    control.disconnect()
    control.loop_stop()
    # Without one, the TLS layer itself refuses (handshake failure, alert or abrupt close).
    assert isinstance(_tls_first_read(broker), ssl.SSLError)


def test_tls_acl_lets_a_device_write_only_its_own_topics(tls_broker_factory) -> None:
    acl = render_mosquitto_acl(TOPICS, {"pi-01": ["dmz"], "pi-02": []}, operators=["alice"])
    broker = tls_broker_factory(acl)
    operator = connect(broker, "alice", cert=broker.tls.client("alice"))
    statuses = collector(operator, f"{TOPICS.base}/device/+/status")
    pi1 = connect(broker, "pi-01", cert=broker.tls.client("pi-01"))

    pi1.publish(TOPICS.status("pi-01"), b"own", qos=1).wait_for_publish(5)
    assert statuses.get(timeout=5).topic == TOPICS.status("pi-01")

    spoof = pi1.publish(TOPICS.status("pi-02"), b"spoofed", qos=1)
    spoof.wait_for_publish(5)
    with pytest.raises(queue.Empty):
        statuses.get(timeout=1.5)

    # A device cannot read another device's commands either.
    pi2_commands = collector(pi1, TOPICS.command("pi-02"))
    operator.publish(TOPICS.command("pi-02"), b"{}", qos=1).wait_for_publish(5)
    with pytest.raises(queue.Empty):
        pi2_commands.get(timeout=1.5)


def test_artifact_server_serves_ranges(artifact_server) -> None:
    data = bytes(range(256)) * 40
    url = artifact_server.add("blob.bin", data)
    with urllib.request.urlopen(url) as response:
        assert response.read() == data
        assert response.headers["Accept-Ranges"] == "bytes"
    request = urllib.request.Request(url, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        assert response.read() == data[100:200]
    request = urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 416
    assert [r.range for r in artifact_server.requests] == [None, "bytes=100-199", f"bytes={len(data)}-"]


def test_artifact_server_refuses_paths_outside_its_root(artifact_server) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(artifact_server.base_url + "/../etc/passwd")
    assert err.value.code == 404


def test_artifact_server_faults(artifact_server) -> None:
    data = b"A" * 200_000
    url = artifact_server.add("m.gguf", data)

    artifact_server.inject("m.gguf", Fault("fail", status=503, times=2))
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(url)
    assert urllib.request.urlopen(url).read() == data  # fault used up

    artifact_server.inject("m.gguf", Fault("truncate", after_bytes=1000))
    with pytest.raises(Exception, match="IncompleteRead|incomplete|Connection"):
        urllib.request.urlopen(url).read()

    artifact_server.inject("m.gguf", Fault("corrupt", after_bytes=5))
    corrupted = urllib.request.urlopen(url).read()
    assert len(corrupted) == len(data)
    assert hashlib.sha256(corrupted).digest() != hashlib.sha256(data).digest()

    artifact_server.inject("m.gguf", Fault("overflow"))
    with urllib.request.urlopen(url) as response:
        assert response.headers["Content-Length"] is None
        assert len(response.read(len(data) * 3)) == len(data) * 3  # keeps sending past the real end

    artifact_server.inject("m.gguf", Fault("stall", after_bytes=10, delay_s=30))
    with urllib.request.urlopen(url, timeout=1) as response, pytest.raises(TimeoutError):
        response.read()


@pytest.mark.slow
def test_bundled_models_load_and_generate_in_llama_cpp(smollm2_model, gemma3_model) -> None:
    from llama_cpp import Llama

    chat = Llama(model_path=str(smollm2_model), n_ctx=256, n_threads=1, verbose=False)
    assert chat.metadata.get("general.architecture") == "llama"
    answer = chat.create_chat_completion(
        messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0.0
    )
    assert answer["choices"][0]["message"]["content"].strip()
    del chat

    base = Llama(model_path=str(gemma3_model), n_ctx=256, n_threads=1, verbose=False)
    assert base.metadata.get("general.architecture") == "gemma3"
    assert base.create_completion("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0][
        "text"
    ]


def test_publishing_a_file_twice_never_writes_to_the_source(artifact_server, tmp_path) -> None:
    """add_file hard-links the source. Publishing it again used to fall back to a copy onto the
    existing link, i.e. truncate and rewrite the source itself (the shared SmolLM2 in site-packages),
    under the workers that had it mapped: a SIGBUS for them."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    before = source.stat()
    url = artifact_server.add_file(source)
    assert artifact_server.add_file(source) == url
    after = source.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    other = tmp_path / "other" / "model.gguf"
    other.parent.mkdir()
    other.write_bytes(b"GGUF new content")
    assert artifact_server.add_file(other) == url  # same name, new file: replaced, source untouched
    assert urllib.request.urlopen(url).read() == b"GGUF new content"
    assert source.stat().st_mtime_ns == before.st_mtime_ns
