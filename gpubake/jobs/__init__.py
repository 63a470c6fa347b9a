"""Training jobs from the laptop: `gpubake job run|sweep|status|logs|fetch|stop|gc|emit`.

- `launch`: the cloud-neutral job (options, sweep values, the runner's spec, job ids, records)
- `runner_code`: the runner's own modules (spec rules, bucket client) loaded from role job_runner
- `gcp`, `aws`: one VM per job through google-cloud-compute / boto3, the pre-start checks
- `emit`: the same jobs for Google Cloud Batch, SkyPilot and Kubernetes
"""
