# elastic_det training image: CUDA PyTorch, the package, and the supervised torchrun behind
# launch/elastic_run.sh.
#
# GPU driver: the base image's PyTorch is built for CUDA 13.0, which needs an NVIDIA driver of the r580
# branch or newer on the host (>= 580.65.06 on Linux x86_64; CUDA's minor-version compatibility lets a
# 580 driver run any 13.x). Nodes with an older driver need another BASE_IMAGE, e.g. a cuda12.x tag of the
# same PyTorch release (driver >= 525 for CUDA 12.x); the NVIDIA container toolkit must be installed.
#
#   docker build -t elastic-det:0.1.0 .
#   docker run --gpus all --shm-size 16g -v "$PWD/work_dirs:/workspace/work_dirs" elastic-det:0.1.0
#       (the default command trains the embedded default config on one machine, one worker per GPU)
#   docker run --gpus all --shm-size 16g -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY elastic-det:0.1.0 \
#       --standalone --nproc-per-node=gpu -m elastic_det.train /opt/elastic_det/configs/... \
#       --work-dir s3://bucket/run
#
# Arguments are torchrun's. `docker stop --time 180` (SIGTERM, then SIGKILL after --time; docker's default
# is 10 s) reaches the supervisor through tini and elastic_run.sh; the workers save a checkpoint and the
# container exits 143. Running the same command again resumes. Give the container
# ELASTIC_DET_GRACE_SECONDS equal to that --time (-e ELASTIC_DET_GRACE_SECONDS=180).
#
# Layers: the dependencies are installed from pyproject.toml alone, before the package is copied, so a code
# change rebuilds only the small layers after it. `COPY --chmod` needs BuildKit (Docker >= 23's default).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini: a PID 1 that forwards signals to its child and reaps orphans (workers run in their own sessions).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash trainer \
    && mkdir -p /workspace \
    && chown trainer:trainer /workspace

WORKDIR /opt/elastic_det

# Dependencies (cached while only the code changes): the [project] dependencies of pyproject.toml; torch
# and torchvision already in the base image satisfy their lines and are kept.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself, without touching the dependencies.
COPY README.md ./
COPY elastic_det ./elastic_det
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import elastic_det, torch, torchvision; print('torch', torch.__version__)"

COPY --chmod=0755 launch ./launch
COPY configs ./configs

ENV TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGUSR1,SIGUSR2 \
    PET_SHUTDOWN_TIMEOUT=120 \
    PET_MAX_RESTARTS=3 \
    PET_RDZV_CONF=last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3 \
    PYTHONUNBUFFERED=1

USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["/usr/bin/tini", "--", "/opt/elastic_det/launch/elastic_run.sh"]
CMD ["--standalone", "--nproc-per-node=gpu", "-m", "elastic_det.train"]
