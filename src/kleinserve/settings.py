"""Settings: the only place kleinserve reads its environment.

Every value can be set as an environment variable with the ``KLEINSERVE_`` prefix
(``KLEINSERVE_MAX_REFERENCES=6``) or from a ``.env`` file; command-line flags override both by
passing keyword arguments to :class:`Settings`. Every bound the request rules enforce is a named
setting here, so an operator can widen or narrow it without touching code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DeviceName = str  # "auto", "cpu", "cuda", "cuda:1", "mps"
DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
OffloadName = Literal["none", "model", "sequential", "group"]
QuantizationName = Literal["none", "int8", "fp8", "int4"]


class Settings(BaseSettings):
    """Runtime configuration of kleinserve (environment prefix ``KLEINSERVE_``)."""

    model_config = SettingsConfigDict(env_prefix="KLEINSERVE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Where jobs, results and built checkpoints live.")
    database_url: str | None = Field(
        None,
        description=(
            "Where jobs, events, keys and limits live: postgresql://user:password@host:5432/db, shared by "
            "several api and worker processes; default (unset): SQLite in the data dir (sqlite:///PATH names "
            "another file)."
        ),
    )
    database_pool: int = Field(
        20,
        ge=2,
        le=500,
        description=(
            "PostgreSQL connections one process may hold (one pool shared by its job, key and webhook "
            "stores); mind the server's max_connections across all processes."
        ),
    )
    device: DeviceName = Field("auto", description="Torch device: auto, cpu, cuda, cuda:N or mps.")
    dtype: DtypeName = Field("auto", description="Torch dtype: auto, bfloat16, float16 or float32.")
    cfg_batch: Literal["auto", "on", "off"] = Field(
        "auto", description="Base variants' CFG passes as one batch: auto (on CUDA only), on or off."
    )
    step_cache: str = Field(
        "off",
        pattern=r"^(off|none|taylorseer)(:[0-9]*\.?[0-9]+)?$",
        description="Step caching for Base requests that do not choose: off or taylorseer[:INTERVAL] (5).",
    )
    vae_tile_above_pixels: int = Field(
        0,
        ge=0,
        description="Decode images with more pixels than this in VAE tiles (less memory, other pixels); 0: never.",
    )
    vae_channels_last: bool = Field(
        False,
        description="The VAE's convolutions in channels_last (faster on CPU and GPU; pixels differ from diffusers' "
        "by float rounding).",
    )
    decoder: str = Field(
        "full",
        pattern=r"^(full|small(=.+)?)$",
        description="VAE decoder: full (the checkpoint's), small (BFL's FLUX.2-small-decoder from the HF cache or "
        "hub; faster, other pixels) or small=PATH (a local copy).",
    )
    preview_decoder: str | None = Field(
        None,
        description="Tiny autoencoder for live previews: a directory or hub repo id in diffusers format "
        "(fal/FLUX.2-Tiny-AutoEncoder); unset: a latent-to-RGB projection derived from the model's VAE.",
    )
    prompt_cache_bytes: int = Field(
        512 * 1024 * 1024,
        ge=0,
        description="Bytes of prompt embeddings kept for reuse (LRU by model and prompt); 0 turns the cache off.",
    )
    devices: str | None = Field(
        None,
        description="Several devices, one worker each, all taking jobs from the same queue: 'cuda:0,cuda:1', "
        "'cpu,cpu' or 'auto' (every visible GPU). Default: one worker on --device.",
    )
    device_memory: float | None = Field(
        None,
        gt=0,
        description="GB the device may use for the models (default: what it has free at start); the memory "
        "plan refuses to start when the models need more.",
    )
    # How the models are loaded (engine/loading.py; README "Memory modes").
    offload: OffloadName = Field("none", description="CPU offloading: none, model, sequential or group.")
    quantize: QuantizationName = Field("none", description="Transformer weights: none, int8, fp8 or int4 (torchao).")
    quantize_text_encoder: QuantizationName = Field(
        "none", description="Text encoder weights: none, int8, fp8 or int4 (torchao)."
    )
    text_encoder_device: str | None = Field(
        None, description="Device of the text encoder when not the main one (e.g. cpu); left out of offloading."
    )
    compile: bool = Field(False, description="Compile the transformer blocks (warmed up before /readyz is 200).")
    loras: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapters offered: NAME=PATH_OR_HUB_ID, a directory of .safetensors, or a file "
        "(comma-separated in the environment).",
    )
    max_loras: int = Field(4, ge=0, le=16, description="Most LoRA adapters one request may apply.")
    lora_cache: int = Field(8, ge=1, description="LoRA adapters kept loaded per model (least recently used go).")
    attention_backend: str | None = Field(
        None, description="diffusers attention backend (native, flash, sage, ...); default: native SDPA."
    )

    # Server.
    host: str = Field("127.0.0.1", description="Address the server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port the server listens on.")
    models: list[str] = Field(
        default_factory=lambda: ["auto"],
        description="Models to serve: ID or ID=PATH, repeatable; 'auto' falls back to tiny demo weights.",
    )
    public_url: str | None = Field(
        None, description="Base URL for result links (default: http://HOST:PORT of the bind address)."
    )
    max_queue: int = Field(100, ge=1, description="Most queued + running jobs; past it new work gets 503.")
    max_queue_per_key: int | None = Field(
        None, ge=1, description="Most queued + running jobs of one API key (default: half of max_queue)."
    )
    max_attempts: int = Field(3, ge=1, description="Runs a job gets before an interruption fails it.")
    lease_seconds: float = Field(
        30, gt=0, description="A running job's lease: a worker silent this long loses the job to the reaper."
    )
    heartbeat_seconds: float = Field(5, gt=0, description="Seconds between a worker's heartbeats and lease renewals.")
    max_batch: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Most compatible queued jobs a worker denoises as one batch (same model, size, steps, guidance, "
        "LoRAs, reference sizes); default: 4 on CUDA, 1 (no batching) on CPU and MPS.",
    )
    batch_window_ms: float = Field(
        20,
        ge=0,
        le=10_000,
        description="Milliseconds a worker waits after claiming a job for more compatible ones to batch it with "
        "(only when batching is on and the queue had no more).",
    )
    reap_interval: float = Field(5, gt=0, description="Seconds between looks for jobs whose lease expired.")
    event_poll: float = Field(
        0.1, gt=0, description="Seconds between reads of events other processes wrote (this process's are at once)."
    )
    retention_seconds: float = Field(7 * 24 * 3600, gt=0, description="How long finished jobs and results stay.")
    cleanup_interval: float = Field(3600, gt=0, description="Seconds between retention sweeps.")
    url_expiry: float = Field(3600, gt=0, description="Seconds a signed result URL stays valid.")

    # Result storage (storage/factory.py chooses the backend).
    storage_url: str | None = Field(
        None,
        description=(
            "Where results and uploads live: unset for DATA_DIR/files on local disk, or s3://BUCKET[/PREFIX] "
            "for S3-compatible object storage (credentials from the usual AWS_* variables or files)."
        ),
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for non-AWS stores (SeaweedFS, MinIO, R2...), e.g. http://10.0.0.5:8333."
    )
    s3_region: str | None = Field(None, description="S3 region (default: the AWS configuration's, else us-east-1).")
    s3_path_style: bool = Field(
        False, description="Address buckets as ENDPOINT/BUCKET (most self-hosted stores) instead of BUCKET.ENDPOINT."
    )
    sync_timeout: float = Field(600, gt=0, description="Longest a sync request waits for its job.")
    sse_replay_seconds: float = Field(
        60, ge=0, description="A new SSE connection first gets the events of this many past seconds."
    )
    keepalive_interval: float = Field(15, gt=0, description="Seconds between SSE keep-alive comments.")

    # Logs (logs.py formats them).
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or as JSON objects.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")
    log_prompts: bool = Field(False, description="Include prompts in job log lines (never, unless set).")

    # Metrics (metrics.py counts, api/metrics_http.py serves them).
    metrics: Literal["off", "open", "admin"] = Field(
        "off", description="GET /metrics: off (404), open to anyone, or admin (Bearer KLEINSERVE_ADMIN_TOKEN)."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the operator: /metrics (KLEINSERVE_METRICS=admin), job ids in /readyz."
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Also expose metrics on this port (no auth; for worker processes)."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the --metrics-port listener binds to.")

    # Safety checker (safety.py applies the policy, engine/classifier.py scores).
    safety_checker: str = Field(
        "off", description="off, or an image classifier with an nsfw label (hub id or directory)."
    )
    safety_policy: Literal["flag", "blur", "refuse"] = Field(
        "blur", description="What a flagged image becomes: flag (returned, reported), blur, or refuse (job fails)."
    )
    safety_threshold: float = Field(0.85, gt=0, le=1, description="nsfw score at or over which an image is flagged.")
    safety_allow_disable: bool = Field(
        False, description="Let clients skip the checker per request (Verda/1min.ai fields); off: always checked."
    )

    # Webhooks (webhooks/ sends them).
    webhook_secret: SecretStr | None = Field(
        None, description="Server webhook secret (whsec_...); default: one kept in DATA_DIR/webhook.secret."
    )
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description="Seconds before each retry of a failed delivery (comma-separated in the environment).",
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds a webhook receiver has to answer.")

    # Request bounds (request.py enforces them).
    max_prompt_chars: int = Field(4096, ge=1, description="Longest prompt accepted, in characters.")
    max_references: int = Field(4, ge=0, le=16, description="Most reference images per request.")
    max_images: int = Field(10, ge=1, le=64, description="Most images generated by one request.")
    min_side: int = Field(64, ge=16, description="Smallest output width or height, in pixels.")
    max_side: int = Field(4096, ge=16, description="Largest output width or height, in pixels.")
    max_pixels: int = Field(4_718_592, ge=256, description="Largest output width x height (4.5 MiP).")
    max_steps: int = Field(100, ge=1, description="Most denoising steps per request.")
    max_guidance: float = Field(20.0, ge=0, description="Largest guidance scale accepted.")

    # Reference image inputs (engine/images.py enforces them).
    max_image_bytes: int = Field(25 * 1024 * 1024, ge=1024, description="Largest input image file.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest input image, in pixels.")
    max_request_image_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Most input image bytes in one request, all images together."
    )
    max_decode_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024 * 1024,
        description="Most memory decoding one input image may take, by its size and pixel mode (checked first).",
    )
    max_concurrent_decodes: int = Field(2, ge=1, description="Uploaded images decoded at once (others wait).")
    fetch_deadline: float = Field(
        30.0, gt=0, description="Seconds a whole image URL fetch may take, redirects and slow bodies included."
    )
    fetch_timeout: float = Field(15.0, gt=0, description="Seconds to connect to / read from image URLs.")
    fetch_max_redirects: int = Field(5, ge=0, le=20, description="Redirects followed when fetching an image.")
    fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Host names or CIDR networks image URLs may point to although they are private or local "
            "(comma-separated in the environment); everything non-public is refused otherwise."
        ),
    )

    # Access (api/auth.py enforces them).
    insecure_no_auth: bool = Field(
        False, description="Serve without API keys on a non-loopback address (refused otherwise)."
    )
    revocation_interval: float = Field(
        2.0,
        gt=0,
        description="Seconds between checks for revoked keys: their jobs are cancelled, their event streams end.",
    )
    max_body_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    body_timeout: float = Field(120, gt=0, description="Seconds a request's whole body may take to arrive (408).")
    request_head_timeout: float = Field(
        10, gt=0, description="Seconds a connection may take to send a request's headers (then it is closed)."
    )
    keep_alive_timeout: float = Field(5, gt=0, description="Seconds an idle keep-alive connection stays open.")
    limit_concurrency: int = Field(
        512, ge=1, description="Most connections and requests at once (SSE streams included); past it, 503."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Host names the server answers to (comma-separated; '*' for any). Default: the loopback names, "
            "the bind address and the --public-url host; any host on a wildcard bind."
        ),
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins whose pages may call the API from a browser (comma-separated; CORS).",
    )
    price_per_image: dict[str, float] = Field(
        default_factory=lambda: {
            "flux-2-klein-4b": 0.04,
            "flux-2-klein-9b": 0.04,
            "flux-2-klein-base-4b": 0.04,
            "flux-2-klein-base-9b": 0.04,
            "flux-2-klein-9b-kv": 0.04,
        },
        description="Credits charged per generated image, by variant (AIgateway quotes $0.040).",
    )

    @field_validator("log_level", "log_format", "metrics", "safety_policy", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("must start with postgresql://, postgres:// or sqlite:///")
        return value or None

    @field_validator("loras", mode="before")
    @classmethod
    def _split_loras(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(item) for item in value.split(",") if item.strip()]
        return value

    @field_validator("fetch_allow", "allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _split_allow(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("fetch_allow")
    @classmethod
    def _check_allow(cls, value: list[str]) -> list[str]:
        # Checked here so a bad entry is a clear settings error at start, not a crash later.
        from kleinserve.engine.fetch import parse_fetch_allow  # late: the engine imports settings

        parse_fetch_allow(value)
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("public_url must start with http:// or https://")
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if value:
            bucket = value.removeprefix("s3://").split("/", 1)[0]
            if not value.startswith("s3://") or not bucket:
                raise ValueError("storage_url must be s3://BUCKET or s3://BUCKET/PREFIX (or unset for local disk)")
        return value or None

    def s3_location(self) -> tuple[str, str] | None:
        """``(bucket, prefix)`` when results go to S3, else ``None`` (local disk)."""
        if not self.storage_url:
            return None
        bucket, _, prefix = self.storage_url.removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")

    def link_base_url(self) -> str:
        """The base of every link the server hands out: ``public_url``, else the bind address.

        Never a request's ``Host`` header, so a client cannot make links point at a host of its
        choosing. A wildcard bind (0.0.0.0, ::) gives a link only the server's own host can follow:
        set ``public_url`` when clients reach the server by another name.
        """
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @model_validator(mode="after")
    def _admin_needs_token(self) -> Settings:
        if self.metrics == "admin" and not (self.admin_token and self.admin_token.get_secret_value()):
            raise ValueError("KLEINSERVE_METRICS=admin needs KLEINSERVE_ADMIN_TOKEN")
        return self

    def queue_share(self) -> int:
        """Most queued + running jobs one API key may hold: the setting, else half the queue."""
        return self.max_queue_per_key if self.max_queue_per_key is not None else max(1, self.max_queue // 2)

    def size_bounds_text(self) -> str:
        """The size rule in words, for error messages and help."""
        return (
            f"width and height must be multiples of 16 between {self.min_side} and {self.max_side}, "
            f"with at most {self.max_pixels} pixels in all"
        )
