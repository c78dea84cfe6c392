"""Run the Flower app through Flower's own CLI, offline, and stop every process it starts.

Two engines, both from the repository root (the app is this project's pyproject.toml):

- ``simulation``: plain ``flwr run .`` against Flower's managed local SuperLink (``:local:``
  connection, simulation runtime, Ray). ``flwr`` starts that SuperLink *detached* and leaves it
  running; we find it by its database path inside our private ``FLWR_HOME`` and stop it by PID.
- ``deployment``: a SuperLink and N SuperNodes on 127.0.0.1 (free ports), then
  ``flwr run . <connection>``; each SuperNode gets ``partition-id``/``num-partitions``.

Both use a private ``FLWR_HOME`` (Flower 1.42 keeps connections in ``$FLWR_HOME/config.toml``)
and ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: without it Flower installs the app's
dependencies into a fresh environment per run (a multi-GB CUDA torch, ignoring our pins).

    python -m simulations.flwr_local simulation --num-supernodes 5 --run-config 'strategy="fedbn" rounds=3'
    python -m simulations.flwr_local deployment --num-supernodes 2 --run-config 'rounds=2 clients=2'
    python -m simulations.flwr_local deployment --secure ...     # Flower's TLS + SuperNode authentication
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from core.fl_config import FLResult
from protos.config import toml_value
from simulations.fl_sim import FLOWER_ENV
from simulations.processes import ProcessGroup

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: private home, no runtime installs, venv tools on PATH."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    """``--run-config`` text: space-separated ``key=value`` with TOML values."""
    return " ".join(f"{k}={toml_value(v, k)}" for k, v in run_config.items())


def _pids_with_arg(fragment: str) -> list[int]:
    """PIDs whose command line contains ``fragment`` (a path unique to our FLWR_HOME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if fragment in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
    return pids


def _wait_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not listen on port {port} within {timeout:.0f} s")


def _write_connection(flwr_home: Path, name: str, body: str) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n{body}\n')


def _flwr_run(procs: ProcessGroup, env: Mapping[str, str], connection: str, run_config: Mapping[str, Any],
              timeout: float, extra: list[str] | None = None) -> None:
    cmd = ["flwr", "run", str(REPO_ROOT), connection, "--stream", "--run-config", run_config_arg(run_config),
           *(extra or [])]
    proc = procs.start("flwr-run", cmd, env, cwd=REPO_ROOT)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"`flwr run` did not finish within {timeout:.0f} s (logs: {procs.log_dir})") from exc
    if rc != 0:
        raise RuntimeError(f"`flwr run` exited with {rc}; see {procs.log_dir / 'flwr-run.log'}")


def _results(out_dir: Path, timeout: float) -> FLResult:
    """results.json once the ServerApp has recorded every round (it runs in another process;
    the file is replaced atomically, so a read sees a whole one)."""
    path = out_dir / "results.json"
    deadline = time.monotonic() + timeout
    problem = "not complete"
    while time.monotonic() < deadline:
        if path.is_file():
            try:
                results = FLResult.read(path)
            except ValueError as exc:  # e.g. a stale file of another version: the run may still replace it
                problem = f"unreadable ({exc})"
            else:
                if results.complete:
                    return results
        time.sleep(1.0)
    raise TimeoutError(f"{path} {problem} within {timeout:.0f} s")


def run_simulation_cli(run_config: Mapping[str, Any], *, num_supernodes: int, work_dir: Path,
                       timeout: float = 1800.0) -> FLResult:
    """``flwr run .`` with the managed local simulation SuperLink; returns the run's result."""
    flwr_home = work_dir / "flwr-home"
    out_dir = Path(str(run_config.get("out-dir") or work_dir / "run")).resolve()
    run_config = {**run_config, "out-dir": str(out_dir), "clients": num_supernodes}
    _write_connection(flwr_home, "local", f'address = ":local:"\noptions.num-supernodes = {num_supernodes}')
    env = flower_env(flwr_home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                     FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    with ProcessGroup(work_dir) as procs:
        try:
            _flwr_run(procs, env, "local", run_config, timeout)
            return _results(out_dir, 60.0)
        finally:
            for pid in _pids_with_arg(str(flwr_home / "local-superlink")):
                procs.adopt("local-superlink", pid)


def supernode_key(path: Path) -> Path:
    """An ECDSA P-384 key pair for SuperNode authentication, in the OpenSSH formats Flower reads:
    the private key at ``path`` (the SuperNode's), the public one at ``path.pub`` (to register)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return pub


@dataclass(frozen=True)
class Deployment:
    """A running local deployment: the SuperLink address and, when secure, the CA to trust."""

    superlink: str
    root_certificates: str = ""  # "" = plaintext (--insecure)


@contextlib.contextmanager
def local_deployment(num_supernodes: int, work_dir: Path, secure: bool = False) -> Iterator[Deployment]:
    """A SuperLink + ``num_supernodes`` SuperNodes on 127.0.0.1; yields where it is and stops every
    process on exit (the deployment engine, as on real machines, on loopback).

    ``secure``: Flower's own TLS (a test CA and server certificate from :mod:`server.certs`; the
    SuperNodes and ``flwr`` verify the SuperLink against the CA) and SuperNode authentication
    (``--enable-supernode-auth``: each SuperNode signs with its own key, whose public half is
    registered with ``flwr supernode register`` before it connects; an unregistered one is refused).
    """
    flwr_home = work_dir / "flwr-home"
    port = free_port()
    env = flower_env(flwr_home)
    tls: list[str] = ["--insecure"]
    node_tls: list[str] = ["--insecure"]
    ca = ""
    if secure:
        from server.certs import make_certs

        certs = make_certs(work_dir / "tls", ["127.0.0.1", "localhost"], days=1)
        ca = str(certs.ca)
        tls = ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
               "--ssl-ca-certfile", ca, "--enable-supernode-auth"]
        node_tls = ["--root-certificates", ca]
    with ProcessGroup(work_dir) as procs:
        link = procs.start("superlink", ["flower-superlink", *tls, "--host", "127.0.0.1", "--port", str(port),
                                         "--disable-runtime-dependency-installation"], env)
        _wait_port(port, link, "SuperLink")
        deployment = Deployment(f"127.0.0.1:{port}", ca)
        for i in range(num_supernodes):
            auth: list[str] = []
            if secure:
                key = work_dir / "supernode-keys" / f"supernode-{i}"
                register_supernode(procs, env, flwr_home, deployment, supernode_key(key), f"node-{i}")
                auth = ["--auth-supernode-private-key", str(key)]
            procs.start(f"supernode-{i}", [
                "flower-supernode", *node_tls, *auth, "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={num_supernodes}"], env)
        yield deployment


def _connection_body(deployment: Deployment) -> str:
    if deployment.root_certificates:
        return f'address = "{deployment.superlink}"\nroot-certificates = "{deployment.root_certificates}"'
    return f'address = "{deployment.superlink}"\ninsecure = true'


def register_supernode(procs: ProcessGroup, env: Mapping[str, str], flwr_home: Path, deployment: Deployment,
                       public_key: Path, name: str) -> None:
    """``flwr supernode register`` a SuperNode's public key with the SuperLink (Control API, TLS)."""
    _write_connection(flwr_home, "remote", _connection_body(deployment))
    proc = procs.start(f"register-{name}", ["flwr", "supernode", "register", str(public_key), "remote"], env,
                       cwd=REPO_ROOT)
    if proc.wait(timeout=120) != 0:
        raise RuntimeError(f"`flwr supernode register` failed for {name}; see {procs.log_dir / f'register-{name}.log'}")


def run_deployment(run_config: Mapping[str, Any], *, num_supernodes: int, work_dir: Path,
                   timeout: float = 1800.0, secure: bool = False) -> FLResult:
    """A SuperLink + ``num_supernodes`` SuperNodes on loopback run the app; returns the run's result."""
    run_config = {**run_config, "clients": num_supernodes}
    run_config.setdefault("out-dir", str(work_dir / "run"))
    with local_deployment(num_supernodes, work_dir, secure=secure) as deployment:
        return run_remote(run_config, superlink=deployment.superlink, work_dir=work_dir, timeout=timeout,
                          root_certificates=deployment.root_certificates)


def run_remote(run_config: Mapping[str, Any], *, superlink: str, work_dir: Path, insecure: bool = True,
               timeout: float = 3600.0, root_certificates: str = "") -> FLResult:
    """``flwr run .`` against a running SuperLink (deployment engine, SuperNodes elsewhere).

    The ServerApp writes ``out-dir`` on the SuperLink's machine: it must be this folder (same
    machine or a shared filesystem) for results.json and the checkpoint to be read back here.
    """
    flwr_home = work_dir / "flwr-home"
    out_dir = Path(str(run_config.get("out-dir") or work_dir / "run")).resolve()
    run_config = {**run_config, "out-dir": str(out_dir)}
    _write_connection(flwr_home, "remote", _connection_body(Deployment(superlink, root_certificates))
                      if root_certificates else f'address = "{superlink}"\ninsecure = {str(insecure).lower()}')
    with ProcessGroup(work_dir) as procs:
        _flwr_run(procs, flower_env(flwr_home), "remote", run_config, timeout)
        return _results(out_dir, 120.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", choices=("simulation", "deployment"))
    p.add_argument("--num-supernodes", type=int, default=5)
    p.add_argument("--run-config", default="", help="space-separated key=value (TOML values)")
    p.add_argument("--work-dir", type=Path, help="logs + private FLWR_HOME (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--secure", action="store_true", help="deployment: Flower's TLS and SuperNode authentication "
                   "(test certificates and keys in the work dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import tomllib

    run_config = tomllib.loads("\n".join(shlex.split(args.run_config, posix=False))) if args.run_config else {}
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix=f"fedshift-{args.engine}-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.engine == "simulation":
        if args.secure:
            p.error("--secure is for the deployment engine")
        results = run_simulation_cli(run_config, num_supernodes=args.num_supernodes, work_dir=work_dir,
                                     timeout=args.timeout)
    else:
        results = run_deployment(run_config, num_supernodes=args.num_supernodes, work_dir=work_dir,
                                 timeout=args.timeout, secure=args.secure)
    log.info("%s via %s: mean accuracy %s; logs in %s", results.strategy, args.engine,
             f"{results.mean_accuracy:.4f}" if results.mean_accuracy is not None else "n/a", work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
