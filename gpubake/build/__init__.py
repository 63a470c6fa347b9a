"""Building an image: a stack's plan (plan, stages, hashing, locks), the guard around a
build (guard, journal), the tools it drives (packer, ansible, docker_engine, hosts, render)
and the flows that order them (flow, targets)."""
