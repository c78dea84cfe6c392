"""TLS with the generated certificates, plaintext refused without --insecure, and every credential
refusal (issue 12, item 1), against a live cloud on loopback."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from core.cema import CemaConfig
from core.export import Preprocess
from core.models import create_model
from edge.config import EdgeConfig
from protos.codec import GRPC_OPTIONS
from protos.fedshift.v1 import edge_pb2 as pb
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc
from protos.tls import channel_credentials
from server.auth import Authenticator, AuthError, add_edge, parse_credentials, revoke_edge
from server.certs import make_certs
from server.cloud import CloudConfig, CloudServer
from simulations.cli import main as fedshift

SIZE = 16


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return (create_model("edge_cnn", 10, image_size=SIZE, width=8).eval(),
            create_model("teacher_resnet", 10, image_size=SIZE, width=8, blocks=1).eval())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    return make_certs(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "localhost"], ["e0", "e1"], days=1)


def _server(models, **kw) -> CloudServer:
    cfg = CloudConfig(image_size=SIZE, cema=CemaConfig(batch_size=4, replay_start=8), rate_interval_s=0.0, port=0,
                      **kw)
    return CloudServer(models[0], models[1], cfg, preprocess=Preprocess()).start()


def _register(channel: grpc.Channel, edge_id: str, token: str = "") -> pb.RegisterReply:
    return pb_grpc.EdgeServiceStub(channel).Register(pb.RegisterRequest(edge_id=edge_id, auth_token=token),
                                                     timeout=5)


def _tls(server: CloudServer, certs, edge: str | None = None) -> grpc.Channel:
    files = ((str(certs.edges[edge][0]), str(certs.edges[edge][1])) if edge else ("", ""))
    return grpc.secure_channel(f"127.0.0.1:{server.port}", channel_credentials(str(certs.ca), *files),
                               options=GRPC_OPTIONS)


def test_tls_handshake_with_the_generated_certificates(models, certs) -> None:
    server = _server(models, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    try:
        assert server.transport == "TLS"
        with _tls(server, certs) as channel:
            assert _register(channel, "e0").version == 0
        # a plaintext client cannot talk to a TLS server
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain, pytest.raises(grpc.RpcError) as err:
            _register(plain, "e0")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # nor one that trusts another CA
        other = make_certs(Path(certs.ca).parent.parent / "other", ["127.0.0.1"])
        with grpc.secure_channel(f"127.0.0.1:{server.port}", channel_credentials(str(other.ca))) as wrong, \
                pytest.raises(grpc.RpcError) as err:
            _register(wrong, "e0")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0.2)


def test_mutual_tls_identifies_the_edge_by_its_certificate(models, certs, tmp_path) -> None:
    creds = tmp_path / "creds.toml"
    add_edge(creds, "e0", cert_cn="e0")
    add_edge(creds, "e1", cert_cn="e1")
    server = _server(models, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                     tls_client_ca=str(certs.ca), credentials=str(creds))
    try:
        assert server.transport == "mutual TLS"
        with _tls(server, certs, "e0") as channel:
            assert _register(channel, "e0").version == 0
            with pytest.raises(grpc.RpcError) as err:  # e0's certificate claiming to be e1
                _register(channel, "e1")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'e0'" in err.value.details()
        # a certificate no entry names: the token identifies the caller (mutual TLS + token entries)
        server.service.auth.reload_interval_s = 0.0
        t1 = add_edge(creds, "e1")  # re-keyed, without a certificate name
        with _tls(server, certs, "e1") as channel:
            assert _register(channel, "e1", t1).version == 0
            with pytest.raises(grpc.RpcError) as err:
                _register(channel, "e1", "wrong")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with _tls(server, certs) as no_cert, pytest.raises(grpc.RpcError) as err:  # no client certificate
            _register(no_cert, "e0")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0.2)


def test_plaintext_is_refused_unless_asked_for(models, tmp_path) -> None:
    with pytest.raises(ValueError, match="--insecure"):
        CloudServer(models[0], models[1], CloudConfig(image_size=SIZE), preprocess=Preprocess())
    with pytest.raises(ValueError, match="--insecure"):
        EdgeConfig(server="127.0.0.1:1").channel_credentials()
    assert EdgeConfig(server="127.0.0.1:1", insecure=True).channel_credentials() is None
    with pytest.raises(FileNotFoundError, match="--tls-key.*no.key"):
        CloudServer(models[0], models[1], CloudConfig(image_size=SIZE, tls_cert=str(tmp_path / "no.pem"),
                                                      tls_key=str(tmp_path / "no.key")), preprocess=Preprocess())
    with pytest.raises(ValueError, match="contradict"):
        CloudConfig(insecure=True, tls_cert="a.pem", tls_key="a.key")


def test_each_credential_refusal_and_reload_without_restart(models, tmp_path) -> None:
    creds = tmp_path / "creds.toml"
    t0, t1 = add_edge(creds, "e0"), add_edge(creds, "e1")
    assert t0 not in creds.read_text() and t1 not in creds.read_text()  # only hashes are stored
    server = _server(models, insecure=True, credentials=str(creds))
    server.service.auth.reload_interval_s = 0.0  # re-read at every call (the default: at most once a second)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert _register(channel, "e0", t0).version == 0
            cases = [("stranger", "x" * 43, grpc.StatusCode.UNAUTHENTICATED),  # unknown edge
                     ("e0", "", grpc.StatusCode.UNAUTHENTICATED),  # known edge, no token
                     ("e0", t0[:-1] + ("A" if t0[-1] != "A" else "B"), grpc.StatusCode.UNAUTHENTICATED),  # wrong
                     ("e1", t0, grpc.StatusCode.PERMISSION_DENIED)]  # e0's token used for e1
            for edge_id, token, code in cases:
                with pytest.raises(grpc.RpcError) as err:
                    _register(channel, edge_id, token)
                assert err.value.code() == code, (edge_id, err.value.details())
            revoke_edge(creds, "e1")
            with pytest.raises(grpc.RpcError) as err:
                _register(channel, "e1", t1)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details()
            t2 = add_edge(creds, "e2")  # a new edge, no restart
            assert _register(channel, "e2", t2).version == 0
            stub = pb_grpc.EdgeServiceStub(channel)  # every RPC is checked, not only Register
            with pytest.raises(grpc.RpcError) as err:
                stub.Upload(pb.UploadRequest(edge_id="e2", sequence=0, auth_token=t1), timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(grace=0.2)


def test_authenticator_keeps_the_last_good_file_and_reloads_by_time(tmp_path) -> None:
    creds = tmp_path / "creds.toml"
    token = add_edge(creds, "e0")
    now = [0.0]
    auth = Authenticator(creds, reload_interval_s=1.0, clock=lambda: now[0])
    auth.check("e0", token)
    creds.write_text("this is [not toml")
    now[0] = 5.0
    auth.check("e0", token)  # a broken file keeps the credentials in force
    t1 = add_edge(tmp_path / "fresh.toml", "e1")
    (tmp_path / "fresh.toml").replace(creds)
    now[0] = 5.5  # within the reload interval: not looked at yet
    with pytest.raises(AuthError):
        auth.check("e1", t1)
    now[0] = 7.0
    auth.check("e1", t1)
    with pytest.raises(AuthError) as err:
        auth.check("e0", token)  # e0 is gone from the new file
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError, match="unknown keys"):
        parse_credentials('[edges.e0]\ntoken = "plain"\n')


def test_certs_and_creds_commands(tmp_path, capsys) -> None:
    assert fedshift(["certs", str(tmp_path / "c"), "--hosts", "127.0.0.1,localhost", "--edges", "a,b"]) == 0
    assert {p.name for p in (tmp_path / "c" / "edges").iterdir()} == {"a.pem", "a.key", "b.pem", "b.key"}
    assert "--tls-client-ca" in capsys.readouterr().out
    assert fedshift(["creds", "add", str(tmp_path / "creds.toml"), "a", "--cert-cn", "a"]) == 0
    token = capsys.readouterr().out.strip()
    assert len(token) >= 40
    assert fedshift(["creds", "revoke", str(tmp_path / "creds.toml"), "a"]) == 0
    assert fedshift(["creds", "list", str(tmp_path / "creds.toml")]) == 0
    assert capsys.readouterr().out.split("\t")[:2] == ["a", "revoked"]
    assert fedshift(["creds", "revoke", str(tmp_path / "creds.toml"), "nobody"]) == 2
