# The MLflow tracking server for a cluster: MLflow with its basic-auth app, plus the
# PostgreSQL driver and the S3 client (the official MLflow image ships neither psycopg2
# nor, in all versions, boto3; basic auth needs the `auth` extra, i.e. Flask-WTF).
#   docker build -f cluster/mlflow.Dockerfile -t registry.example.com/grokstudy-mlflow:3.17.2 cluster
# Keep MLFLOW_VERSION equal to cluster/constraints.txt (tests/test_cluster_configs.py checks it).
# Pinned by digest (a tag moves); cluster/pin-images.sh refreshes it.
FROM python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff

ARG MLFLOW_VERSION=3.17.2
LABEL org.opencontainers.image.title="grokstudy-mlflow" \
      org.opencontainers.image.description="MLflow tracking server with basic auth, PostgreSQL and S3 support, for grokstudy clusters" \
      org.opencontainers.image.licenses="MIT"

RUN pip install --no-cache-dir --disable-pip-version-check \
        "mlflow[auth]==${MLFLOW_VERSION}" "Flask-WTF==1.3.0" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
    && useradd --create-home --uid 1000 mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# Basic auth is always on: every request but /health needs an MLflow user's password.
# Configuration comes from the environment, so no credential ever appears on a command
# line: MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_SERVER_ALLOWED_HOSTS,
# AWS_* / MLFLOW_S3_ENDPOINT_URL, PGPASSWORD, and for basic auth MLFLOW_AUTH_CONFIG_PATH
# (an ini naming the user database), MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD
# (the admin created at the first start) and MLFLOW_FLASK_SERVER_SECRET_KEY.
# 0.0.0.0 is inside the container; the host port (compose) or Service decides who reaches it.
ENTRYPOINT ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", "5000", "--serve-artifacts"]
