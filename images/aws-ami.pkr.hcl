# Target `aws-ami`: its variables and source (the build is in vm.pkr.hcl, shared). An AMI
# is built on a GPU instance, so that gpu-smoke runs on the real GPU before the
# AMI exists. Leak-proof: spot pricing, instance-initiated
# shutdown terminates, the instance powers itself off after max_run_minutes,
# run tags carry the input hash; -on-error=cleanup terminates it on failure.

variable "aws_region" {
  type        = string
  description = "AWS region to build in (gpubake checks it is set)."
  default     = ""
}

variable "aws_profile" {
  type        = string
  description = "Named profile from ~/.aws/config; empty: the environment's credentials."
  default     = ""
}

variable "aws_instance_type" {
  type        = string
  description = "Build instance type: a GPU type from images/gpus.yml (e.g. g4dn.xlarge), or a CPU type with --no-gpu-build."
  default     = ""
}

variable "aws_source_ami_name" {
  type        = string
  description = "Name filter of the source AMI, e.g. debian-12-amd64-* or ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*."
  default     = ""
}

variable "aws_source_ami_owner" {
  type        = string
  description = "Owner of the source AMI (Debian 136693071363, Canonical 099720109477)."
  default     = ""
}

variable "aws_root_device" {
  type        = string
  description = "Root device name of the source AMI (/dev/xvda on Debian, /dev/sda1 on Ubuntu)."
  default     = ""
}

variable "spot" {
  type        = bool
  description = "Build on a spot instance."
  default     = true
}

source "amazon-ebs" "gpubake" {
  region                    = var.aws_region
  profile                   = var.aws_profile
  instance_type             = var.aws_instance_type
  spot_price                = var.spot ? "auto" : ""
  shutdown_behavior         = "terminate"
  ssh_username              = var.ssh_username
  ssh_clear_authorized_keys = true
  ami_name                  = var.image_name
  tags                      = var.image_labels
  snapshot_tags             = var.image_labels
  run_tags                  = var.image_labels
  user_data                 = "#!/bin/sh\nshutdown -h +${var.max_run_minutes} 'gpubake build instance: maximum run time reached'\n"

  source_ami_filter {
    filters = {
      name                = var.aws_source_ami_name
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = [var.aws_source_ami_owner]
    most_recent = true
  }

  launch_block_device_mappings {
    device_name           = var.aws_root_device
    volume_size           = var.disk_size_gb
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }
}
