# The user-code image: this project installed from the locked set, run as a non-root user. The same image runs
# the code server (its default command) and every run that DockerRunLauncher launches (the launcher replaces
# the command with `dagster api execute_run ...`), and may run the webserver and daemon too (deploy/docker/).
#
# Build it with `make image` (deploy/docker/build_image.sh): pip has no index inside the build, so the script
# first downloads the locked wheels on the host into build/docker/wheelhouse, the offline pattern that also
# keeps the image's packages exactly requirements.lock's, hash-checked.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS locked
# requirements.lock is resolved for Python 3.11 (its markers and wheels); say so here, not as a pip error.
RUN python3 -c 'import sys; v = sys.version_info; v[:2] == (3, 11) or sys.exit(f"error: the base image has Python {v[0]}.{v[1]}, requirements.lock is for 3.11. Fix: --build-arg BASE_IMAGE=<an image with Python 3.11> (MARKETFS_BASE_IMAGE for make image)")'
RUN python3 -m venv /opt/venv
COPY build/docker/wheelhouse /wheels
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --quiet --no-index --find-links /wheels --require-hashes -r /tmp/requirements.lock

FROM ${BASE_IMAGE}
# The locked venv without the wheelhouse it was installed from (half the image's size); a layer that changes
# only with the lock, so a changed source file rebuilds the small layers below and nothing else.
COPY --from=locked /opt/venv /opt/venv
# A fixed uid, so a mounted landing folder's permissions can name it. Home holds MARKETFS_HOME (Data Docs) and
# DAGSTER_HOME (a run's local artefacts) where this user can write.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /opt/dagster marketfs \
    && mkdir -p /opt/dagster/marketfs /opt/dagster/dagster_home \
    && chown -R marketfs:marketfs /opt/dagster
COPY build/docker/build-tools /tmp/build-tools
COPY pyproject.toml README.md /tmp/src/
COPY marketfs /tmp/src/marketfs
COPY assets /tmp/src/assets
COPY pipelines /tmp/src/pipelines
COPY expectations /tmp/src/expectations
# Not editable: the image holds a copy. setuptools for the build comes from build-tools (pyproject's backend).
RUN /opt/venv/bin/pip install --quiet --no-index --find-links /tmp/build-tools --no-deps /tmp/src \
    && rm -rf /tmp/src /tmp/build-tools
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MARKETFS_HOME=/opt/dagster/marketfs \
    DAGSTER_HOME=/opt/dagster/dagster_home
USER marketfs
WORKDIR /opt/dagster
EXPOSE 4000
# A CMD, not an ENTRYPOINT: DockerRunLauncher starts run containers of this image with its own command.
# DAGSTER_CURRENT_IMAGE (set where the container is started) tells the launcher which image runs use.
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "pipelines.definitions", "-a", "defs"]
