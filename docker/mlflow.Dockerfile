# A small MLflow tracking server image for docker/compose.yml (the letngpt image would work
# too, but it is tens of GB). MLFLOW_VERSION should match the clients' major version. psycopg (3)
# is the PostgreSQL driver of a `postgresql+psycopg://` backend store (compose.yml's); the
# image's own default, without arguments, is a SQLite file.
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG_VERSION=3.3.9
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg[binary]==${PSYCOPG_VERSION}" \
    && useradd --create-home --uid 1000 --shell /bin/bash mlflow \
    && mkdir -p /mlflow/db /mlflow/artifacts \
    && chown -R mlflow:mlflow /mlflow
USER 1000
WORKDIR /mlflow
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000", \
     "--backend-store-uri", "sqlite:////mlflow/db/mlflow.db", \
     "--artifacts-destination", "/mlflow/artifacts", "--serve-artifacts"]
