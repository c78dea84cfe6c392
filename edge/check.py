"""``fedshift edge check``: try a board's whole setup once, before leaving it running.

Why: an edge left running under systemd with a typo in its server address, a stale model file or
a revoked credential fails quietly at 3 am. The check runs each part the edge will use, in the
order the edge uses them, and reports one line per part: ``ok`` with what it found, or
``FAIL`` with what is wrong and how to fix it. Checked:

- the config (the settings a run needs; a board should have a fixed ``edge_id``, which its
  credential names);
- the model file (ONNX metadata, normalization tensors, one test inference: finite logits of the
  model's class count);
- the source (opened; a finite source also yields its first batch; ``stdin`` and ``watch`` are
  only parsed, as reading them would consume or wait for input);
- the connection (TLS files readable, the TLS handshake, the credential accepted, the model
  registered: one ``Register`` call, which is what the edge does first anyway).

The exit status is 0 when every part is ``ok``, 1 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from edge.config import EdgeConfig
from protos.contract import TOKEN_ENV, token_or_env


@dataclass(frozen=True)
class Finding:
    """One part of the setup: ``ok`` and what was found, or what is wrong and the fix."""

    part: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.part}: {self.detail}"
        return f"FAIL  {self.part}: {self.detail}" + (f" -> {self.fix}" if self.fix else "")


def check(cfg: EdgeConfig, *, connect_timeout_s: float = 10.0) -> list[Finding]:
    """Every part of ``cfg``'s setup, in the order an edge uses them."""
    findings = [_config(cfg)]
    runtime, finding = _model(cfg)
    findings.append(finding)
    if runtime is not None:
        findings.append(_source(cfg, runtime))
        if cfg.with_cloud and cfg.server:
            findings.append(_connection(cfg, runtime, connect_timeout_s))
    return findings


def _config(cfg: EdgeConfig) -> Finding:
    if missing := cfg.missing():
        return Finding("config", False, f"missing {', '.join(missing)}",
                       f"set {missing[0]} in the config file or give --{missing[0].replace('_', '-')}")
    if cfg.with_cloud and not cfg.edge_id:
        return Finding("config", False, "no edge_id: each start would register as a new edge (host name + pid)",
                       "set edge_id (the id the cloud's credentials file names)")
    return Finding("config", True, f"edge {cfg.edge_id or '(forward-only)'}, server {cfg.server}")


def _model(cfg: EdgeConfig):
    from edge.runtime import EdgeRuntime

    try:
        runtime = EdgeRuntime(cfg.model, threads=cfg.threads, providers=cfg.providers)
    except FileNotFoundError:
        return None, Finding("model", False, f"{cfg.model} does not exist", "give the .onnx file `fedshift export` "
                                                                           "wrote (model = ...)")
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        return None, Finding("model", False, f"{cfg.model} does not load as a fedshift edge model: "
                                             f"{type(exc).__name__}: {str(exc)[:200]}",
                             "re-export it with `fedshift export` (a plain ONNX file lacks the fedshift metadata)")
    c, h, w = runtime.input_shape
    try:
        logits = runtime.predict(np.zeros((1, h, w, c), np.uint8))
    except Exception as exc:  # noqa: BLE001
        return None, Finding("model", False, f"test inference failed: {type(exc).__name__}: {str(exc)[:200]}",
                             "re-export the model; check onnxruntime's version")
    if logits.shape != (1, runtime.num_classes) or not np.all(np.isfinite(logits)):
        return None, Finding("model", False, f"test inference gave {logits.shape} logits (finite: "
                                             f"{bool(np.all(np.isfinite(logits)))}), expected (1, {runtime.num_classes})",
                             "re-export the model")
    return runtime, Finding("model", True, f"{cfg.model}: {runtime.model_name or '?'}, {runtime.num_classes} classes, "
                                           f"input {h}x{w}x{c}, {len(runtime.norm_names)} norm tensors, inference ok")


def _source(cfg: EdgeConfig, runtime) -> Finding:
    from edge.sources import open_source

    kind = cfg.source.split(":", 1)[0]
    try:
        source = open_source(cfg.source, cfg.batch_size, runtime.input_shape, runtime.class_names)
        if kind in ("stdin", "watch"):
            return Finding("source", True, f"{cfg.source} (not read: it would consume or wait for input)")
        batch = next(iter(source), None)
    except Exception as exc:  # noqa: BLE001 - any failure to open or read is the finding
        return Finding("source", False, f"{cfg.source}: {type(exc).__name__}: {str(exc)[:200]}",
                       "fix source (npz:PATH | npy:PATH | folder:DIR | watch:DIR | camera:N | stdin:HxWxC)")
    if batch is None:
        return Finding("source", False, f"{cfg.source} holds no images", "point source at a stream with images")
    return Finding("source", True, f"{cfg.source}: first batch {tuple(batch.images.shape)} uint8")


def _connection(cfg: EdgeConfig, runtime, connect_timeout_s: float) -> Finding:
    from edge.client import CloudClient, RetryPolicy, status_code

    try:
        credentials = cfg.channel_credentials()
    except (OSError, ValueError) as exc:
        return Finding("connection", False, str(exc), "fix the tls_ca / tls_cert / tls_key paths (PEM files), or "
                                                      "insecure = true on a trusted network")
    token = token_or_env(cfg.token)
    client = CloudClient(cfg.server, cfg.edge_id or "edge-check", token, min(cfg.timeout_s, connect_timeout_s),
                         connect_timeout=connect_timeout_s, retry=RetryPolicy(max_attempts=1),
                         credentials=credentials)
    try:
        reply = client.register(runtime)
    except grpc.RpcError as exc:
        return _refusal(cfg, status_code(exc), exc.details() if hasattr(exc, "details") else str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. RetriesExhausted: the cloud did not answer
        code = getattr(exc, "code", None)
        return _refusal(cfg, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN, str(exc))
    finally:
        client.close()
    transport = "TLS" if credentials is not None else "plaintext"
    return Finding("connection", True, f"{cfg.server} ({transport}): registered as {cfg.edge_id}, cloud version "
                                       f"{reply.version}, next sequence {reply.next_sequence}")


def _refusal(cfg: EdgeConfig, code: grpc.StatusCode, details: str) -> Finding:
    """The fix for each way the cloud can refuse or fail to answer."""
    details = (details or "").strip()[:300]
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if any(w in details.lower() for w in ("handshake", "ssl", "certificate", "tls")):
            return Finding("connection", False, f"TLS handshake with {cfg.server} failed: {details}",
                           "tls_ca must be the CA that signed the cloud's certificate, whose names must include "
                           "the host in server; with mutual TLS the cloud must trust this edge's certificate")
        return Finding("connection", False, f"no answer from {cfg.server} ({code.name}: {details})",
                       "check the server address and port, that `fedshift cloud` runs there, and the network "
                       "(a plaintext cloud needs insecure = true, a TLS one tls_ca)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Finding("connection", False, f"the cloud refused the credential: {details}",
                       f"set token (or ${TOKEN_ENV}) to this edge's token from `fedshift creds add`, or use the "
                       "certificate the credentials file names")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Finding("connection", False, f"the cloud refused this edge: {details}",
                       "the credential is revoked or belongs to another edge_id: ask for a new one "
                       "(`fedshift creds add`)")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return Finding("connection", False, f"the cloud does not accept this model: {details}",
                       "run the edge model exported from the cloud's student")
    return Finding("connection", False, f"{code.name}: {details}", "see the cloud's log")
