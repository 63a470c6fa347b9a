"""The label namespace of gpubake's images and build containers, and the label every image
carries its input hash in (plan, guard and the publishing side read them; gpubake.build.plan
has the others)."""

LABEL_PREFIX = "io.gpubake"
HASH_LABEL = f"{LABEL_PREFIX}.input-hash"
