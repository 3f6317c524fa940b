# The MLflow tracking server for a cluster: MLflow plus the PostgreSQL driver and the S3
# client (the official MLflow image ships neither psycopg2 nor, in all versions, boto3).
#   docker build -f cluster/mlflow.Dockerfile -t registry.example.com/grokstudy-mlflow:3.17.2 cluster
# Keep MLFLOW_VERSION equal to cluster/constraints.txt (tests/test_cluster_configs.py checks it).
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
LABEL org.opencontainers.image.title="grokstudy-mlflow" \
      org.opencontainers.image.description="MLflow tracking server with PostgreSQL and S3 support, for grokstudy clusters" \
      org.opencontainers.image.licenses="MIT"

RUN pip install --no-cache-dir --disable-pip-version-check \
        "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
    && useradd --create-home --uid 1000 mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# Configuration comes from the environment (MLFLOW_BACKEND_STORE_URI,
# MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_SERVER_ALLOWED_HOSTS, AWS_* / MLFLOW_S3_ENDPOINT_URL),
# so no credential ever appears on a command line.
ENTRYPOINT ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--serve-artifacts"]
