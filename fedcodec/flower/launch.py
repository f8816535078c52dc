"""Start Flower's processes on loopback and run the fedcodec app: ``fedcodec flower ...`` and the tests.

:class:`LocalFederation` starts a ``flower-superlink`` and ``flower-supernode`` processes on
127.0.0.1 (free ports, a private ``FLWR_HOME``), writes a SuperLink connection into that home's
``config.toml`` and runs ``flwr run`` against it. With ``simulation=True`` the SuperLink runs
Flower's simulation engine instead (Ray; ``num-supernodes`` virtual nodes, no SuperNode processes).
Every process is started in its own session and stopped with its whole process tree (SIGTERM, then
SIGKILL), including the helpers Flower detaches (SuperExec, ServerApp/ClientApp processes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

#: the repository's Flower app project (``flwr run`` takes this directory)
APP_DIR = Path(__file__).resolve().parents[2] / "flower_app"
CONNECTION = "fedcodec-local"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(roots: Sequence[int]) -> set[int]:
    """``roots`` and all their living descendants (Linux ``/proc``)."""
    kids, seen, todo = _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(kids.get(pid, []))
    return {p for p in seen if _alive(p)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def processes_with_home(home: Path) -> set[int]:
    """Living processes whose environment has ``FLWR_HOME=home``: everything a federation started,
    including the helpers Flower detaches into their own sessions."""
    needle = b"\0" + f"FLWR_HOME={home}".encode() + b"\0"
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                env = b"\0" + Path(f"/proc/{entry}/environ").read_bytes() + b"\0"
            except OSError:
                continue
            if needle in env and _alive(int(entry)):
                found.add(int(entry))
    return found


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(procs: Sequence[subprocess.Popen], grace: float = 3.0, extra=None) -> None:
    """Stop ``procs`` and every process they started: SIGTERM, wait ``grace`` s, SIGKILL the rest.
    ``extra()`` names more processes to stop (asked again after each signal)."""
    more = extra or set
    tree = process_tree([p.pid for p in procs]) | more()
    _signal(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        tree |= process_tree(list(tree)) | more()  # children spawned while shutting down
        if not any(_alive(p) for p in tree):
            break
        time.sleep(0.1)
    tree |= process_tree(list(tree)) | more()
    _signal({p for p in tree if _alive(p)}, signal.SIGKILL)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1"})
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # default 1 s: a second lost per message
    return env


def _exe(name: str) -> str:
    """A console script of the running interpreter's environment (falls back to ``$PATH``)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def make_certificates(directory: Path, nodes: int, host: str = "127.0.0.1") -> dict[str, Path]:
    """A throwaway PKI for a local federation: a CA, a SuperLink certificate for ``host`` (and
    ``localhost``) signed by it, and one EC P-384 key pair per SuperNode (OpenSSH format, as
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` want them).
    For real deployments make the certificates with your own CA (see the README)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=7))
    pem, no_pass = serialization.Encoding.PEM, serialization.NoEncryption()
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcodec local CA")])
    ca = (x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                  serial_number=x509.random_serial_number(), **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    try:
        names = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        names = [x509.DNSName(host)]
    cert = (x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]),
                                    issuer_name=ca_name, public_key=key.public_key(),
                                    serial_number=x509.random_serial_number(), **valid)
            .add_extension(x509.SubjectAlternativeName([*names, x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(cert.public_bytes(pem))
    files["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pass))
    for i in range(nodes):
        node_key = ec.generate_private_key(ec.SECP384R1())
        files[f"node{i}"] = directory / f"supernode-{i}.key"
        files[f"node{i}.pub"] = directory / f"supernode-{i}.key.pub"
        files[f"node{i}"].write_bytes(node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, no_pass))
        files[f"node{i}.pub"].write_bytes(node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    for path in files.values():
        if path.name.endswith(".key"):
            path.chmod(0o600)
    return files


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (or a simulation SuperLink).

    Use as a context manager; ``run()`` submits the app with ``flwr run`` and waits for it.
    SuperNode ``i`` gets ``--node-config 'partition-id=i num-partitions=num_nodes'``, followed by
    ``node_configs[i]`` where given (more ``key=value`` pairs, e.g. a test hook of the ClientApp).

    By default every connection uses TLS (a throwaway CA from :func:`make_certificates`) and the
    SuperLink only admits SuperNodes whose public keys were registered with ``flwr supernode
    register`` (``--enable-supernode-auth``). ``insecure=True`` runs plain HTTP with no node
    authentication (loopback tests). The simulation SuperLink has no SuperNodes to authenticate.
    """

    def __init__(self, num_nodes: int, workdir: str | Path | None = None, simulation: bool = False,
                 insecure: bool = False, startup_timeout: float = 60.0, node_configs: dict[int, str] | None = None):
        self.num_nodes = num_nodes
        self.node_configs = dict(node_configs or {})
        self.simulation = simulation
        self.insecure = insecure
        self.startup_timeout = startup_timeout
        self._own_dir = workdir is None
        workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fedcodec-flwr-"))
        self.workdir = workdir.resolve()
        self.home = self.workdir / "flwr-home"
        self.certs: dict[str, Path] = {}
        self.node_ids: dict[int, int] = {}  # partition → node id registered for its key (secure mode)
        self.logs = self.workdir / "logs"
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self._files: list = []

    # -- processes --------------------------------------------------------------------------------
    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        f = open(self.logs / log_name, "ab")
        self._files.append(f)
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=flower_env(self.home), cwd=self.workdir, start_new_session=True)

    def start(self) -> "LocalFederation":
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        args = [_exe("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.insecure:
            args.append("--insecure")
        else:
            self.certs = make_certificates(self.workdir / "certs", 0 if self.simulation else self.num_nodes)
            args += ["--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
                     "--ssl-ca-certfile", str(self.certs["ca"])]
            if not self.simulation:
                args.append("--enable-supernode-auth")
        if self.simulation:
            args.append("--simulation")
        self.superlink = self._spawn(args, "superlink.log")
        self._write_connection()
        self._wait_superlink()
        if not self.simulation:
            for i in range(self.num_nodes):
                if not self.insecure:
                    self.node_ids[i] = self.register(self.certs[f"node{i}.pub"])
                self.start_node(i)
        return self

    def register(self, public_key: Path) -> int:
        """``flwr supernode register``: admit the SuperNode holding the matching private key."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json", timeout=60)
        m = re.search(r'"node-id":\s*(\d+)', res.stdout) or re.search(r"SuperNode (\d+) registered", res.stdout)
        if res.returncode != 0 or m is None:
            raise RuntimeError(f"flwr supernode register failed: {res.stdout}{res.stderr}")
        return int(m.group(1))

    def start_node(self, partition: int, private_key: Path | None = None, log_name: str | None = None,
                   insecure: bool | None = None) -> subprocess.Popen:
        """Start a SuperNode for ``partition`` (its own key pair unless ``private_key`` is given); it is
        appended to ``self.nodes`` (SuperNode ``i`` of :meth:`start` is ``self.nodes[i]``)."""
        insecure = self.insecure if insecure is None else insecure
        args = [_exe("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                "--node-config", f"partition-id={partition} num-partitions={self.num_nodes} "
                                 f"{self.node_configs.get(partition, '')}".strip()]
        if insecure:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.certs["ca"]),
                     "--auth-supernode-private-key", str(private_key or self.certs[f"node{partition}"])]
        self.nodes.append(self._spawn(args, log_name or f"supernode-{partition}.log"))
        return self.nodes[-1]

    def kill_node(self, partition: int) -> None:
        """Kill SuperNode ``partition`` and its ClientApp processes at once (SIGKILL)."""
        node = self.nodes[partition]
        _signal(process_tree([node.pid]), signal.SIGKILL)
        node.wait(timeout=10)

    def _write_connection(self) -> None:
        security = "insecure = true\n" if self.insecure else f'root-certificates = "{self.certs["ca"]}"\n'
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n{security}')

    def _wait_superlink(self) -> None:
        import httpx

        import ssl

        scheme = "http" if self.insecure else "https"
        verify = True if self.insecure else ssl.create_default_context(cafile=str(self.certs["ca"]))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.superlink.returncode}; "
                                   f"see {self.logs / 'superlink.log'}")
            try:
                if httpx.get(f"{scheme}://127.0.0.1:{self.port}/health", timeout=1.0, verify=verify).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink not ready after {self.startup_timeout:.0f} s; "
                           f"see {self.logs / 'superlink.log'}")

    def stop(self) -> None:
        procs = [p for p in [self.superlink, *self.nodes] if p is not None]
        kill_tree(procs, extra=lambda: processes_with_home(self.home))
        for f in self._files:
            f.close()
        self._files.clear()

    def pids(self) -> set[int]:
        """Every living process of this federation (for leak checks)."""
        return (process_tree([p.pid for p in [self.superlink, *self.nodes] if p is not None])
                | processes_with_home(self.home))

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- runs -------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([_exe("flwr"), *args], env=flower_env(self.home), cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def run(self, run_config: Sequence[str] = (), app_dir: str | Path = APP_DIR,
            timeout: float | None = None, stream_to=None) -> "RunResult":
        """``flwr run APP CONNECTION --stream`` with ``run_config`` (``key=value`` strings); waits for
        the run to end and returns its id, status and the streamed log."""
        args = [_exe("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        for item in run_config:
            args += ["--run-config", item]
        if self.simulation:
            args += ["--federation-config", f"num-supernodes={self.num_nodes}"]
        log_path = self.logs / "flwr-run.log"
        with open(log_path, "w") as f:
            proc = subprocess.Popen(args, env=flower_env(self.home), cwd=self.workdir, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                kill_tree([proc], grace=1)

            timer = threading.Timer(timeout, expire) if timeout is not None else None
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                for line in proc.stdout:
                    f.write(line)
                    f.flush()
                    if stream_to is not None:
                        stream_to.write(line)
                        stream_to.flush()
                proc.wait()
            finally:
                if timer is not None:
                    timer.cancel()
                if proc.poll() is None:
                    kill_tree([proc], grace=1)
        if expired.is_set():
            raise subprocess.TimeoutExpired(args, timeout, output=log_path.read_text())
        output = log_path.read_text()
        m = re.search(r"Successfully started run (\d+)", output)
        run_id = int(m.group(1)) if m else None
        return RunResult(run_id, proc.returncode, self.status(run_id) if run_id is not None else "", output)

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it, e.g. ``finished:completed``."""
        res = self.flwr("ls", "--run-id", str(run_id), CONNECTION, "--format", "json", timeout=60)
        try:
            runs = json.loads(res.stdout)["runs"]
        except (ValueError, KeyError):
            return f"unknown ({res.stdout.strip() or res.stderr.strip()})"
        return runs[0].get("status", "unknown") if runs else "unknown"

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RunResult:
    def __init__(self, run_id: int | None, returncode: int, status: str, output: str):
        self.run_id, self.returncode, self.status, self.output = run_id, returncode, status, output

    @property
    def ok(self) -> bool:
        return self.run_id is not None and self.returncode == 0 and self.status.endswith("completed")

    def __repr__(self) -> str:
        return f"RunResult(run_id={self.run_id}, returncode={self.returncode}, status={self.status!r})"
