# The re-ID training service's images (docker-compose.yml builds them).
#
#   docker build --build-arg FAISS_EXTRA=cpu -t reid-service:cpu .   # API, migrations, dispatcher
#   docker build --build-arg FAISS_EXTRA=gpu -t reid-service:gpu .   # GPU training workers
#   docker build --target mlflow -t reid-mlflow .                     # MLflow tracking server
#
# FAISS: the `gpu` extra (faiss-gpu>=1.15) is for GPU workers, the `cpu` extra (faiss-cpu)
# for everything else. Never both: the two wheels ship the same `faiss` module and the last one
# installed silently wins. FAISS_EXTRA picks exactly one.
#
# torch/torchvision come from PyPI, whose Linux x86_64 wheels are CUDA builds (the CUDA runtime
# ships as nvidia-* wheels): the same image runs on a CPU and, with the NVIDIA container
# toolkit and a device reservation, on GPUs. Only the host needs a driver.
#
# No secrets are baked in: passwords, tokens and URLs holding them come from the environment
# at run time (docker-compose.yml); .dockerignore keeps .env and local state out of the context.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# procps: pgrep, for the workers' and dispatcher's process healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps \
    && rm -rf /var/lib/apt/lists/*

# One unprivileged user for every service (uid/gid 10001; files on shared volumes belong to it).
RUN groupadd --system --gid 10001 reid \
    && useradd --system --uid 10001 --gid reid --create-home --home-dir /home/reid \
       --shell /usr/sbin/nologin reid

# ---------------------------------------------------------------------------------------------
# MLflow tracking server: database backend (PostgreSQL through psycopg 3), proxied artifacts.
FROM base AS mlflow

ARG MLFLOW_VERSION=3.18.0
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.2"

# The artifact store (a volume in docker-compose.yml; created here so that a new named volume
# starts out owned by the unprivileged user).
RUN mkdir -p /mlartifacts && chown reid:reid /mlartifacts

USER reid
WORKDIR /home/reid
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--serve-artifacts", \
     "--artifacts-destination", "/mlartifacts", "--workers", "1"]

# ---------------------------------------------------------------------------------------------
# The project: API (`service`), migrations, workers and dispatcher (`worker`), trainer
# (`reid_core`). The last stage, so the default target.
FROM base AS app

# cpu | gpu: which faiss the image gets (see the top of this file).
ARG FAISS_EXTRA=cpu
RUN case "${FAISS_EXTRA}" in \
      cpu|gpu) ;; \
      *) echo "FAISS_EXTRA must be cpu or gpu, not '${FAISS_EXTRA}'" >&2; exit 1 ;; \
    esac

# NVIDIA container toolkit: expose the CUDA driver libraries (and nvidia-smi) to GPU workers.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /app

# Dependencies first, in their own layer (torch is most of the image): read from pyproject.toml
# (the core dependencies plus the service, worker, onnx and chosen faiss extras), so that a code change
# does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = ['service', 'worker', 'onnx', sys.argv[1]]; \
print('\n'.join(p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]]))" \
        "${FAISS_EXTRA}" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself, editable: service.core.migrate finds migrations/ next to the packages.
COPY alembic.ini ./
COPY migrations ./migrations
COPY reid_core ./reid_core
COPY service ./service
COPY worker ./worker
RUN pip install -e ".[service,worker,${FAISS_EXTRA}]" \
    && python -c "import service.app, worker.celery_app"

# Where the service keeps uploads and job outputs (REID_DATA_DIR in docker-compose.yml) and where
# dataset folders are mounted (REID_DATASET_ROOTS); owned by the service user so that new named
# volumes are writable.
RUN mkdir -p /var/lib/reid/jobs /var/lib/reid/uploads /data/reid \
    && chown -R reid:reid /var/lib/reid

USER reid
ENV REID_DATA_DIR=/var/lib/reid
EXPOSE 8000
# The API (uvicorn, REID_API_WORKERS processes); docker-compose.yml runs migrations, workers and
# the dispatcher from the same image with `python -m service migrate`, `python -m worker run ...`,
# `python -m worker dispatcher`.
CMD ["python", "-m", "service", "serve", "--no-migrate", "--host", "0.0.0.0", "--port", "8000"]
