"""AWS: the boto3 session, its clients and their errors as one line, the caller's identity
and the AMI lookups, for the build's preflight and for `gpubake job` (gpubake.jobs.aws)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gpubake import GpubakeError, one_line
from gpubake.clouds import CloudError

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 3

_REFUSED_CREDENTIALS = frozenset(
    {
        "AuthFailure",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "InvalidAccessKeyId",
        "UnrecognizedClientException",
    }
)
_NOT_ALLOWED = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})


class AwsSession:
    """One region (and profile) of an account through boto3: every botocore error becomes
    one line of `error_type` that says what failed and how to fix it."""

    def __init__(
        self,
        region: str | None,
        profile: str | None = None,
        *,
        endpoint_url: str | None = None,
        error_type: type[GpubakeError] = CloudError,
        agent: str = "gpubake",
        purpose: str = "AWS",
    ) -> None:
        self.region_hint, self.profile, self.endpoint_url = region, profile, endpoint_url
        self.error_type, self.agent, self.purpose = error_type, agent, purpose
        self._session: Any = None
        self._clients: dict[str, Any] = {}

    @property
    def session(self) -> Any:
        if self._session is None:
            import boto3
            from botocore.exceptions import BotoCoreError

            try:
                session = boto3.session.Session(
                    profile_name=self.profile, region_name=self.region_hint
                )
            except BotoCoreError as exc:
                raise self._error("opening the AWS session", exc) from None
            if not session.region_name:
                raise self.error_type(
                    f"--region is required for {self.purpose} (or set AWS_REGION, or a region "
                    "in the profile)"
                )
            try:
                check_region(session.region_name, "the region")
            except GpubakeError as exc:
                raise self.error_type(str(exc)) from None
            self._session = session
        return self._session

    @property
    def region(self) -> str:
        return str(self.session.region_name)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            from botocore.config import Config

            config = Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                user_agent_extra=self.agent,
            )
            kwargs: dict[str, Any] = {"config": config}
            if self.endpoint_url:
                kwargs["endpoint_url"] = self.endpoint_url
            self._clients[service] = self.session.client(service, **kwargs)
        return self._clients[service]

    def _error(self, what: str, exc: Exception) -> GpubakeError:
        from botocore import exceptions as bx

        profile = self.profile or "default"
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            text = (
                f"{what}: no AWS credentials (profile {profile}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, run `aws configure sso`, or pass --profile with a "
                "profile from ~/.aws/config"
            )
        elif isinstance(exc, bx.ProfileNotFound):
            text = (
                f"{what}: --profile {self.profile}: no such profile in ~/.aws/config or "
                "~/.aws/credentials (see `aws configure list-profiles`)"
            )
        elif isinstance(
            exc, bx.SSOTokenLoadError | bx.TokenRetrievalError | bx.UnauthorizedSSOTokenError
        ):
            text = f"{what}: the SSO login has expired: run `aws sso login --profile {profile}`"
        elif isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
            text = f"{what}: {exc}: check the network, the region and AWS_ENDPOINT_URL"
        elif isinstance(exc, bx.ReadTimeoutError | bx.ConnectionClosedError):
            text = f"{what}: AWS did not answer ({exc}): try again"
        elif isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "error"))
            message = str(error.get("Message", "")).split("Encoded authorization failure")[0]
            if code in _REFUSED_CREDENTIALS:
                text = (
                    f"{what}: AWS refused the credentials of profile {profile} ({code}): renew "
                    "them (`aws sso login`, or new keys with `aws configure`)"
                )
            elif code in _NOT_ALLOWED:
                text = (
                    f"{what}: not allowed ({code}: {message.strip()}): grant the identity of "
                    f"profile {profile} the permission, or use --profile with one that has it"
                )
            else:
                text = f"{what}: {code}: {message}"
        else:
            text = f"{what}: {exc}"
        return self.error_type(one_line(text))

    def _call(self, what: str, service: str, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client(service), operation)(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(what, exc) from None

    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _try(self, what: str, func: Callable[[], Any], *, missing: Callable[[str], bool]) -> Any:
        """func(), None when the cloud says the thing is missing (missing(code) is true)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return func()
        except ClientError as exc:
            if missing(self._code(exc)):
                return None
            raise self._error(what, exc) from None
        except BotoCoreError as exc:
            raise self._error(what, exc) from None

    # ------------------------------------------------------------------ preflight

    def check_credentials(self) -> str:
        """The caller's ARN; refuses missing or rejected credentials."""
        from botocore.exceptions import BotoCoreError

        try:
            credentials = self.session.get_credentials()
        except BotoCoreError as exc:
            raise self._error("reading the AWS credentials", exc) from None
        if credentials is None:
            profile = self.profile or "default"
            raise self.error_type(
                f"no AWS credentials (profile {profile}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, run `aws configure sso`, or pass --profile with a "
                "profile from ~/.aws/config"
            )
        identity = self._call("checking the AWS credentials", "sts", "get_caller_identity")
        return str(identity.get("Arn", ""))

    def find_tagged_image(self, key: str, value: str) -> str | None:
        """The newest AMI of this account tagged key=value, or None."""
        images = self._call(
            f"looking up AMIs tagged {key}={value[:12]}...",
            "ec2",
            "describe_images",
            Owners=["self"],
            Filters=[{"Name": f"tag:{key}", "Values": [value]}],
        )["Images"]
        newest = sorted(images, key=lambda image: image.get("CreationDate", ""))
        return str(newest[-1]["ImageId"]) if newest else None


# -- what the EC2 and IAM APIs refuse, known offline ----------------------------------------
# Each rule from AWS's own documentation (the page beside it); a value that breaks one is
# refused in one line naming the value and the rule, before any request is printed or sent.

#: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/resource-ids.html: 8 or 17 hex digits
_ID = r"[0-9a-f]{8}(?:[0-9a-f]{9})?"
_AMI = re.compile(rf"^ami-{_ID}$")
_SNAPSHOT = re.compile(rf"^snap-{_ID}$")
#: https://docs.aws.amazon.com/IAM/latest/APIReference/API_CreateInstanceProfile.html
_PROFILE_NAME = re.compile(r"^[\w+=,.@-]{1,128}$")
#: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/using-regions-availability-zones.html:
#: a Zone is its Region's code and a letter; a Local or Wavelength Zone adds -LOCATION-Na
_ZONE_SUFFIX = re.compile(r"^(?:[a-z]|-[a-z0-9-]+-\d+[a-z])$")
#: https://docs.aws.amazon.com/ebs/latest/userguide/general-purpose.html: gp3 1 GiB to 16 TiB
DISK_GB = (1, 16384)


#: https://docs.aws.amazon.com/global-infrastructure/latest/regions/aws-regions.html
_REGION = re.compile(r"^[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-[0-9]+$")


def check_region(value: str, source: str = "--region") -> str:
    if not _REGION.match(value):
        raise CloudError(f"{source} '{value}' is not an AWS region: write e.g. us-east-1")
    return value


def check_ami(value: str) -> None:
    if not _AMI.match(value):
        raise CloudError(
            f"--image {value!r} is not an AMI id (ami- and 8 or 17 hex digits): give ami-..., "
            "or leave --image out for the newest gpubake AMI"
        )


def check_snapshot(value: str) -> None:
    if not _SNAPSHOT.match(value):
        raise CloudError(
            f"--dataset-disk {value!r}: on AWS the dataset is an EBS snapshot id (snap- and 8 "
            "or 17 hex digits)"
        )


def check_instance_profile(value: str) -> None:
    if not _PROFILE_NAME.match(value):
        raise CloudError(
            f"--instance-profile {value!r}: an instance profile name is 1-128 characters of "
            "letters, digits and +=,.@_-"
        )


def check_zone(zone: str, region: str) -> None:
    if not (zone.startswith(region) and _ZONE_SUFFIX.match(zone[len(region) :])):
        raise CloudError(
            f"--zone {zone} is not an Availability Zone of region {region} ({region}a, "
            f"{region}b, ...)"
        )


def check_gpu_count(count: int, machine_type: str | None) -> None:
    """On EC2 the instance type decides how many GPUs there are."""
    if count != 1 and not machine_type:
        raise CloudError(
            f"--gpu-count {count}: on EC2 the instance type decides the number of GPUs: give "
            "--machine-type with a type that has them (e.g. g4dn.12xlarge: 4 T4)"
        )


def check_disk_size(gb: int) -> None:
    low, high = DISK_GB
    if not low <= gb <= high:
        raise CloudError(f"--disk-size {gb} GB: an EBS gp3 volume is {low} to {high} GiB")


def check_results(url: str) -> None:
    if not url.startswith("s3://"):
        raise CloudError(f"--results {url}: AWS jobs write to S3: give s3://BUCKET/PREFIX")
