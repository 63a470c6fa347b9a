"""Which local image a build takes for a stage whose inputs are unchanged (flow._identical):
its own stack's, or the identical stage of another stack's (every stack of an OS has the same
os stage), but only one that sits on the very image the build is on. An engine that lived
through earlier runs holds several with the same input hash: one on a base image that was
made again since (test_faults makes it again) must not hide one on the current base."""

from __future__ import annotations

import time
from contextlib import suppress
from types import SimpleNamespace

import docker
import pytest

from gpubake.build import flow
from gpubake.build.plan import HASH_LABEL
from gpubake.build.stages import STAGE_REPOSITORY
from tests.integration.helpers import base_image, remove_stack_images, tiny_image

HASH = "0" * 63 + "1"  # no real stage has it


@pytest.fixture(scope="module")
def images(engine):
    """The base, an older base (made from scratch: no layer in common) and three images
    labelled with HASH: the stale one of another stack on the older base (made last, so the
    engine lists it first), a good one of another stack on the base, and none of the own."""
    base = engine.images.get(base_image(engine))
    tags = {
        "older": "gpubake-reuse-test/base:older",
        "good": f"{STAGE_REPOSITORY}/zz-reuse-good:os-{HASH[:12]}",
        "stale": f"{STAGE_REPOSITORY}/zz-reuse-stale:os-{HASH[:12]}",
    }
    made = {"older": tiny_image(engine, "scratch", tags["older"], {}, "older")}
    made["good"] = tiny_image(engine, base.id, tags["good"], {HASH_LABEL: HASH}, "good")
    time.sleep(1.1)  # the engine lists by creation time, in whole seconds
    made["stale"] = tiny_image(engine, made["older"].id, tags["stale"], {HASH_LABEL: HASH}, "stale")
    yield SimpleNamespace(base=base, **made)
    for tag in (tags["stale"], tags["good"], tags["older"]):
        with suppress(docker.errors.APIError):
            engine.images.remove(tag)


def _stage(final: bool) -> SimpleNamespace:
    """What flow._identical reads of a stage: its own repository and tag, hash, and place."""
    plan = SimpleNamespace(
        image_repository=f"{STAGE_REPOSITORY}/zz-reuse-own",
        image_ref=f"{STAGE_REPOSITORY}/zz-reuse-own:os-{HASH[:12]}",
    )
    return SimpleNamespace(plan=plan, input_hash=HASH, final=final)


def test_the_stage_of_another_stack_on_the_same_base_is_taken(engine, images):
    listed = [i.id for i in engine.images.list(filters={"label": f"{HASH_LABEL}={HASH}"})]
    assert listed.index(images.stale.id) < listed.index(images.good.id)  # the trap is set
    assert flow._identical(engine, _stage(final=False), images.base).id == images.good.id


def test_on_the_older_base_the_one_built_there_is_taken(engine, images):
    assert flow._identical(engine, _stage(final=False), images.older).id == images.stale.id


def test_a_final_stage_takes_only_its_own_stackstiny_image(engine, images):
    assert flow._identical(engine, _stage(final=True), images.base) is None


def test_removing_a_stacks_images_leaves_another_stacks_tag(engine, images):
    """The suite's clean-up (helpers.remove_stack_images) after a stack that took another
    stack's os stage: that stack's tag stays, so the next stack built still finds it."""
    taken = f"{STAGE_REPOSITORY}/zz-reuse-taker:os-{HASH[:12]}"
    images.good.tag(taken)
    remove_stack_images(engine, ("zz-reuse-taker",), "itest")
    with pytest.raises(docker.errors.ImageNotFound):
        engine.images.get(taken)
    assert flow._identical(engine, _stage(final=False), images.base).id == images.good.id
