"""Each role converges in a Debian 12 container, and converges again with zero changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import HOST_BUNDLE, apply, base_image, container

pytestmark = pytest.mark.docker
PLAYBOOK = Path(__file__).with_name("role_test.yml")
CA_VARS = {
    "build_ca_bundle": str(HOST_BUNDLE),
    "build_ca_environment": {
        name: "/run/gpubake-build/ca-bundle.crt"
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE")
    },
}


@pytest.fixture(scope="module")
def debian(engine):
    return base_image(engine)


def converge_twice(engine, image, roles):
    # image_cleanup removes the build-time CA on purpose: test it without one
    ca = {} if "image_cleanup" in roles else CA_VARS  # apt needs no CA: plain HTTP
    variables = {"roles_under_test": roles, **ca}
    with container(engine, image) as box:
        first, _ = apply(box, PLAYBOOK, variables)
        second, output = apply(box, PLAYBOOK, variables)
    assert first["changed"] > 0, "the first run must do something"
    assert second["changed"] == 0, output[-4000:]
    assert second["failed"] == 0


# build_ca, base, python_env, gpu_smoke_test and manifest converge twice, by FQCN from a
# consumer's playbook, in test_collection_consumer.py
@pytest.mark.parametrize("roles", [["base", "image_cleanup"]], ids=lambda r: "+".join(r))
def test_light_roles_converge_twice(engine, debian, roles):
    converge_twice(engine, debian, roles)
