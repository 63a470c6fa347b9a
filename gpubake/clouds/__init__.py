"""Each cloud in one place: what gpubake knows and asks of it, through the cloud's own SDK.

- `gcp.GcpSession`, `aws.AwsSession`: credentials (google.auth.default(), a boto3 Session), the
  API clients and their errors as one line, and the image lookups; the build's preflight
  (`build`) and `gpubake job` (gpubake.jobs.gcp / aws, which extend the sessions) use them.
- `build`: the checks a cloud build target makes before Packer starts.

A third cloud is a module here with its session, its Packer file (images/<target>.pkr.hcl),
its data (images/gpus.yml, images/stacks.yml) and its entry in gpubake.build.targets.
"""

from __future__ import annotations

from gpubake import GpubakeError


class CloudError(GpubakeError):
    """A cloud option, credential or answer the user has to act on (one line)."""
