# Target `gcp-image`: its variables and source (the build is in vm.pkr.hcl, shared). A GCP
# image is built on a VM with the GPU attached, so that gpu-smoke runs on the real
# GPU before the image exists. Leak-proof: a
# preemptible (spot) build VM that stops itself after max_run_minutes, labelled
# with the input hash; Packer's -on-error=cleanup deletes it on failure.

variable "gcp_project" {
  type        = string
  description = "GCP project to build in (gpubake checks it is set)."
  default     = ""
}

variable "gcp_zone" {
  type        = string
  description = "Zone of the build VM; it must offer the accelerator."
  default     = ""
}

variable "gcp_source_image_family" {
  type        = string
  description = "Image family the build starts from, e.g. debian-12 or ubuntu-2404-lts-amd64."
  default     = ""
}

variable "gcp_source_image_project" {
  type        = string
  description = "Project of the source image family, e.g. debian-cloud or ubuntu-os-cloud."
  default     = ""
}

variable "gcp_machine_type" {
  type        = string
  description = "Machine type of the build VM (one that takes the accelerator, e.g. n1-standard-8 for T4)."
  default     = ""
}

variable "gcp_accelerator_type" {
  type        = string
  description = "Accelerator attached to an N1 build VM (e.g. nvidia-tesla-t4); empty where the machine type brings its GPUs (A2, A3, G2) or with --no-gpu-build."
  default     = ""
}

variable "gcp_gpu" {
  type        = bool
  description = "The build VM has a GPU (attached or bundled with its machine type): it cannot live-migrate."
  default     = true
}

variable "gcp_accelerator_count" {
  type        = number
  description = "Number of accelerators attached during the build."
  default     = 1
}

variable "image_family" {
  type        = string
  description = "Image family of the resulting image."
  default     = ""
}

variable "preemptible" {
  type        = bool
  description = "Build on a preemptible (spot-priced) VM."
  default     = true
}

source "googlecompute" "gpubake" {
  project_id              = var.gcp_project
  zone                    = var.gcp_zone
  source_image_family     = var.gcp_source_image_family
  source_image_project_id = [var.gcp_source_image_project]
  machine_type            = var.gcp_machine_type
  accelerator_type        = var.gcp_accelerator_type == "" ? "" : "projects/${var.gcp_project}/zones/${var.gcp_zone}/acceleratorTypes/${var.gcp_accelerator_type}"
  accelerator_count       = var.gcp_accelerator_type == "" ? 0 : var.gcp_accelerator_count
  on_host_maintenance     = var.gcp_gpu ? "TERMINATE" : "MIGRATE"
  preemptible             = var.preemptible
  disk_size               = var.disk_size_gb
  disk_type               = "pd-balanced"
  image_name              = var.image_name
  image_family            = var.image_family
  image_labels            = var.image_labels
  labels                  = var.image_labels
  ssh_username            = var.ssh_username
  metadata = {
    startup-script = "#!/bin/sh\nshutdown -h +${var.max_run_minutes} 'gpubake build VM: maximum run time reached'\n"
  }
}
