# gpubake's own builder image: the toolkit with Packer and Ansible, for running
# gpubake without installing anything (CI runners, laptops). Built by
# scripts/builder-image.sh, which prepares build/builder/ (the context's only
# build-time input besides the repository):
#   scripts/builder-image.sh [--ca-bundle FILE] [--base IMAGE] [--tag TAG]
#   docker run --rm gpubake/builder stacks
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/out:/out" gpubake/builder \
#     render --target gcp-image --out /out/gcp
#   docker run --rm -e GOOGLE_APPLICATION_CREDENTIALS=/creds.json -v ~/key.json:/creds.json:ro \
#     gpubake/builder build --target gcp-image --project P --zone Z
# The cloud targets need nothing from the host. (--target docker needs the host's
# Docker Engine and shared temp paths; run gpubake on the host for it.)
ARG BASE=debian:12

# ---- stage 1: the Python environment. The optional CA bundle (TLS-inspecting
# proxies) is used here only and never reaches the final image.
FROM ${BASE} AS env
# scripts/builder-image.sh removes this stage's image (it holds the bundle) after the build
LABEL io.gpubake.builder-stage=env
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY build/builder/ca-bundle.pem /tmp/ca-bundle.pem
# the package as a user installs it (not editable): the wheel carries roles, playbooks,
# images and ansible.cfg as gpubake/_data, so the final image needs no source tree
COPY pyproject.toml setup.py MANIFEST.in README.md LICENSE CHANGELOG.md galaxy.yml ansible.cfg /tmp/src/
COPY gpubake /tmp/src/gpubake
COPY images /tmp/src/images
COPY meta /tmp/src/meta
COPY plugins /tmp/src/plugins
COPY playbooks /tmp/src/playbooks
COPY roles /tmp/src/roles
RUN if [ -s /tmp/ca-bundle.pem ]; then export PIP_CERT=/tmp/ca-bundle.pem; fi \
 && python3 -m venv /opt/gpubake/.venv \
 && /opt/gpubake/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -q /tmp/src \
 && rm -rf /tmp/ca-bundle.pem /tmp/src

# ---- stage 2: the image: Packer and ssh from Debian, and the environment
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 ca-certificates packer openssh-client \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && useradd --create-home --uid 1000 --shell /bin/bash gpubake
COPY --from=env /opt/gpubake/.venv /opt/gpubake/.venv
ENV PATH=/opt/gpubake/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="gpubake/builder" \
      org.opencontainers.image.description="gpubake with Packer and Ansible"
USER gpubake
WORKDIR /home/gpubake
ENTRYPOINT ["gpubake"]
CMD ["--help"]
