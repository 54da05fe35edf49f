# kubetune image: CUDA runtime + pinned PyTorch + kubetune[train] (and [ui]: the chart's optional
# `launcher ui` Deployment runs the same image).
# Build: docker build -t REGISTRY/kubetune:0.1.0 .   (see docs/kubernetes.md)
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Debian packages the base lacks; a base that already has them passes APT_PACKAGES= .
# build-essential + python3-dev: torch.compile (compile_unet) builds its Triton kernels with
# the C compiler against the Python headers at the first compiled step.
ARG APT_PACKAGES="python3 python3-venv python3-dev build-essential ca-certificates"
# Offline builds (tests/cluster/local-cluster.sh image): pip reads these when they are set,
# e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=http://127.0.0.1:PORT/ for a wheelhouse on the host.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS

# Caches and scratch live under /cache and /tmp: the Job mounts emptyDirs there because the
# root filesystem is read-only (launcher.manifests.POD_CACHE_ENV sets the same paths).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kubetune \
    PATH=/opt/kubetune/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TRITON_CACHE_DIR=/cache/triton \
    MPLCONFIGDIR=/tmp/matplotlib

RUN if [ -n "$APT_PACKAGES" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends $APT_PACKAGES \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

# Dependencies first, from pyproject.toml alone (empty packages and README stand in), so a
# code or docs change rebuilds only the last, small layers.
WORKDIR /src
COPY pyproject.toml ./
RUN mkdir kubetune runner launcher && touch README.md kubetune/__init__.py runner/__init__.py launcher/__init__.py \
    && pip install ".[train,gpu,ui]" "torch==${TORCH_VERSION}" --extra-index-url "$TORCH_INDEX_URL" \
    && pip uninstall -y kubetune && rm -rf /src/*
COPY pyproject.toml README.md ./
COPY kubetune ./kubetune
COPY runner ./runner
COPY launcher ./launcher
RUN pip install --no-deps . && rm -rf /src

# A fixed non-root UID/GID 1000 (the Job's runAsUser); Ubuntu 24.04 ships a user 'ubuntu'
# with that UID, which is replaced.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp kubetune \
    && mkdir -p /cache && chown 1000:1000 /cache

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "runner"]
