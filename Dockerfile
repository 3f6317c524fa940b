# syntax=docker/dockerfile:1
# One image for the Ray head and the Ray workers: rayproject/ray plus grokstudy and its
# pinned dependencies, installed by cluster/install.sh (the script CI runs too).
#
#   GPU (default):  docker build -t grokstudy:2.60.0-py311-gpu .
#   CPU:            docker build -t grokstudy:2.60.0-py311-cpu \
#                     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Keep the Ray and Python versions in RAY_IMAGE equal to cluster/constraints.txt and to
# every image named under cluster/ (tests/test_cluster_configs.py checks this).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

ARG RAY_IMAGE
# torch is not in the Ray image. PyPI's Linux wheels bring their own CUDA runtime (the
# host needs only a recent NVIDIA driver); the CPU build sets TORCH_INDEX_URL instead.
# install.sh installs TORCH_SPEC as given (TORCH_VARIANT=default): its auto choice looks
# for nvidia-smi, which a docker build does not have, GPU image or not.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
# The Ray image's own lock. install.sh applies it to every package that
# cluster/constraints.txt does not pin, so pip does not move Ray's dependencies
# (grpcio, protobuf, pydantic, ...) to versions Ray was not built against. Set to ""
# to ignore it.
ARG RAY_CONSTRAINTS=/home/ray/requirements_compiled.txt

LABEL org.opencontainers.image.title="grokstudy" \
      org.opencontainers.image.description="Ray head/worker image for grokstudy: distributed phase-diagram studies of grokking (Ray Tune + Optuna + MLflow + PyTorch)" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${RAY_IMAGE}"

# The Ray image's unprivileged user (uid 1000, group users); never root at run time.
# The source directory is made by that user: only BuildKit creates a missing WORKDIR
# as USER, and pip builds the package inside it.
USER ray
RUN mkdir -p /home/ray/grokstudy
WORKDIR /home/ray/grokstudy
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_AUTH_MODE=token

# 1. Dependencies. Only the files that decide them are copied, so editing grokstudy/
#    reuses this (large) layer. The s3 extra (boto3): the study's storage lease on S3 is
#    taken by a conditional put.
COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users cluster/install.sh cluster/constraints.txt cluster/
RUN TORCH_SPEC="${TORCH_SPEC}${TORCH_INDEX_URL:+ --index-url ${TORCH_INDEX_URL}}" \
    EXTRA_CONSTRAINTS="$(if [ -n "${RAY_CONSTRAINTS}" ] && [ -f "${RAY_CONSTRAINTS}" ]; then echo "${RAY_CONSTRAINTS}"; fi)" \
    TORCH_VARIANT=default PYTHON=python GROKSTUDY_PART=deps GROKSTUDY_EXTRAS=s3 GROKSTUDY_EDITABLE=0 \
    sh cluster/install.sh

# 2. grokstudy itself, without touching the dependencies.
COPY --chown=ray:users README.md ./
COPY --chown=ray:users grokstudy/ grokstudy/
RUN PYTHON=python GROKSTUDY_PART=package GROKSTUDY_EXTRAS=s3 GROKSTUDY_EDITABLE=0 \
    sh cluster/install.sh

# The shipped study files, so a RayJob can run one without uploading a working dir.
COPY --chown=ray:users studies/ studies/

# No ENTRYPOINT: KubeRay and `ray up` run their own `ray start` commands in this image.
# No token and no credentials are baked in: they arrive at run time (see cluster/README.md).
CMD ["bash"]
