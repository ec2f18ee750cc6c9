# PostgreSQL from Debian's own `postgresql` package, for the tests' compose stack
# (docker/compose.test.yml) on machines without an image registry: `docker/build.sh postgres`
# builds it on the debootstrap base of `make image`. It behaves like the official postgres image
# as far as compose.yml uses it: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB create the
# database on first start, the data live in /var/lib/postgresql/data, PGPORT moves the port.
ARG BASE_IMAGE=letngpt-base:bookworm
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's package would create and start a cluster "main"; the entrypoint makes its own instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql \
    && pg_dropcluster 15 main \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres /var/lib/postgresql/data /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/
ENV PATH=/usr/lib/postgresql/15/bin:${PATH} \
    PGDATA=/var/lib/postgresql/data
# hadolint ignore=DL3066
USER postgres
EXPOSE 5432
ENTRYPOINT ["bash", "/usr/local/bin/postgres-entrypoint.sh"]
