# elastic_det training image: CUDA PyTorch, the package, and torchrun behind launch/elastic_run.sh.
#
#   docker build -t elastic-det:0.1.0 .
#   docker run --gpus all --shm-size 16g -v "$PWD/work_dirs:/workspace/work_dirs" elastic-det:0.1.0
#       (the default command trains the embedded default config on one machine, one worker per GPU)
#   docker run --gpus all --shm-size 16g -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY elastic-det:0.1.0 \
#       --standalone --nproc-per-node=gpu -m elastic_det.train /opt/elastic_det/configs/... \
#       --work-dir s3://bucket/run
#
# Arguments are torchrun's. `docker stop` (SIGTERM, then SIGKILL after --time, 10 s by default: use
# `docker stop --time 180`) reaches torchrun through tini and elastic_run.sh; the workers save a checkpoint
# and the container exits 143. Running the same command again resumes.
#
# The base must ship a torch whose torchrun has --signals-to-handle and --shutdown-timeout (checked on
# 2.14.1); pick the CUDA flavour that matches the nodes' driver.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini: a PID 1 that forwards signals to its child and reaps orphans (workers run in their own sessions).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/elastic_det

# Dependencies first (cached while only the code changes); torch/torchvision come from the base image.
COPY pyproject.toml README.md ./
COPY elastic_det ./elastic_det
RUN pip install --no-cache-dir . \
    && python -c "import elastic_det, torch, torchvision; print('torch', torch.__version__)"

COPY launch ./launch
COPY configs ./configs

RUN chmod 0755 launch/*.sh launch/slurm/*.sbatch \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash trainer \
    && mkdir -p /workspace \
    && chown trainer:trainer /workspace

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
