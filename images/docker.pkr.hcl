# Target `docker`: a container image committed from a container that the
# container playbook provisions through Ansible's docker connection.

variable "base_image" {
  type        = string
  description = "Local image the build starts from (gpubake pulls it or builds one with debootstrap first)."
}

variable "image_repository" {
  type        = string
  description = "Repository of the resulting image, e.g. gpubake/pytorch."
}

variable "image_tag" {
  type        = string
  description = "Tag of the resulting image."
  default     = "latest"
  validation {
    condition     = length(var.image_tag) > 0 && length(var.image_tag) <= 128 && ! contains(["-", "."], substr(var.image_tag, 0, 1))
    error_message = "A Docker tag is up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'."
  }
}

variable "container_name" {
  type        = string
  description = "Name of the temporary build container (unique per build)."
}

variable "docker_changes" {
  type        = list(string)
  description = "Dockerfile instructions applied at commit: USER, WORKDIR, ENV, LABEL, CMD."
  default     = []
}

variable "container_gpus" {
  type        = list(string)
  description = "docker run options giving the build container this machine's GPUs (e.g. [\"--gpus\", \"all\"]) for gpu-smoke's GPU checks; empty: none."
  default     = []
}

variable "container_labels" {
  type        = list(string)
  description = "docker run options labelling the build container with the lock its build holds (e.g. [\"--label\", \"io.gpubake.build-lock=...\"]), so that the next build finds it if this one is killed."
  default     = []
}

variable "container_network" {
  type        = list(string)
  description = "docker run options for the build container's network (--offline: [\"--network\", \"none\"]); empty: Docker's default bridge."
  default     = []
}

variable "cache_volumes" {
  type        = map(string)
  description = "Host folders bind-mounted into the build container (the download cache, or the wheelhouse read-only); a mount is not committed into the image."
  default     = {}
}

source "docker" "gpubake" {
  image         = var.base_image
  pull          = false
  commit        = true
  container_dir = "/tmp/packer-files"
  # as root: a stage may start from an image whose USER is gpubake (a derived stack's parent)
  run_command = concat(["-d", "-i", "-t", "-u", "root", "--name", var.container_name], var.container_labels, var.container_gpus, var.container_network, ["{{.Image}}", "/bin/sh"])
  volumes     = var.cache_volumes
  changes     = var.docker_changes
}

locals {
  ansible_arguments = concat([
    "--extra-vars", "@${path.root}/ansible-vars.json",
    "--extra-vars", "ansible_connection=community.docker.docker ansible_host=${var.container_name}",
  ], var.ansible_extra_arguments)
}

build {
  sources = ["source.docker.gpubake"]

  # The stage's roles, then gpu-smoke (the image counts as built only if it passes in it).
  provisioner "ansible" {
    command          = var.ansible_playbook_command
    playbook_file    = "${local.collection}/playbooks/container_image.yml"
    user             = "root"
    extra_arguments  = local.ansible_arguments
    ansible_env_vars = local.ansible_env_vars
  }

  post-processor "docker-tag" {
    repository = var.image_repository
    tags       = [var.image_tag]
  }
}
