# VM targets (gcp-image, aws-ami, qemu): the variables and the build they share; the
# provisioners (VM playbook, gpu-smoke, seal + validate) exist once, here. Each
# target's source is in its own file (gcp-image.pkr.hcl, aws-ami.pkr.hcl, qemu.pkr.hcl): a render
# holds one of them, and gpubake writes the `sources` line below with that one only.

variable "disk_size_gb" {
  type        = number
  description = "Boot disk size in GB (gpubake checks it against what the stack needs)."
}

variable "image_name" {
  type        = string
  description = "Name of the resulting image."
}

variable "image_labels" {
  type        = map(string)
  description = "Labels (GCP) or tags (AWS) of the image and of the build machine: stack, versions, input hash."
}

variable "max_run_minutes" {
  type        = number
  description = "The build VM powers itself off after this many minutes, whatever happens to Packer."
  default     = 120
}

variable "ansible_ssh_extra_args" {
  type        = list(string)
  description = "Extra ansible-playbook arguments for Packer's SSH proxy (Packer 1.6 needs ssh-rsa allowed)."
  default     = []
}

variable "ssh_username" {
  type        = string
  description = "User Packer logs in as on the build VM (packer on GCP; admin on Debian, ubuntu on Ubuntu AMIs)."
}

locals {
  # Packer's SSH proxy speaks the classic SCP protocol only (OpenSSH 9's scp uses SFTP); a VM
  # just rebooted (or emulated: qemu without KVM) can take longer than Ansible's default
  # 10 s to connect and to answer sudo
  ansible_vm_env_vars = concat(local.ansible_env_vars, ["ANSIBLE_SCP_EXTRA_ARGS=-O", "ANSIBLE_TIMEOUT=60"])
  ansible_arguments = concat(
    ["--become", "--extra-vars", "@${path.root}/ansible-vars.json"],
    var.ansible_ssh_extra_args,
    var.ansible_extra_arguments,
  )
}

build {
  sources = ["source.googlecompute.gpubake", "source.amazon-ebs.gpubake", "source.qemu.gpubake"]

  provisioner "ansible" {
    command          = var.ansible_playbook_command
    playbook_file    = "${local.collection}/playbooks/vm.yml"
    user             = var.ssh_username
    extra_arguments  = local.ansible_arguments
    ansible_env_vars = local.ansible_vm_env_vars
  }

  # The new driver loads at boot. Packer reboots the VM itself: Ansible's reboot
  # module cannot reconnect through Packer's SSH proxy, so the playbook runs with
  # nvidia_driver_reboot=false and gpu-smoke runs after this, on the loaded driver.
  provisioner "shell" {
    inline            = ["sudo systemctl reboot"]
    expect_disconnect = true
    skip_clean        = true
  }

  # Back after the reboot: this command starts once the VM answers SSH again (a slow boot,
  # e.g. under QEMU's emulation, takes longer than any fixed pause; Ansible through Packer's
  # proxy would not retry the connection).
  provisioner "shell" {
    pause_before        = "30s"
    inline              = ["uptime"]
    start_retry_timeout = "15m"
    skip_clean          = true
  }

  # Last: the image exists only if gpu-smoke passes on the attached GPU.
  provisioner "ansible" {
    command          = var.ansible_playbook_command
    playbook_file    = "${local.collection}/playbooks/smoke.yml"
    user             = var.ssh_username
    extra_arguments  = local.ansible_arguments
    ansible_env_vars = local.ansible_vm_env_vars
  }

  # VM images only, after gpu-smoke: remove SSH host keys, machine-id, cloud-init
  # state and login keys, then validate the bake (fails it if anything is left).
  provisioner "ansible" {
    command          = var.ansible_playbook_command
    playbook_file    = "${local.collection}/playbooks/seal.yml"
    user             = var.ssh_username
    extra_arguments  = local.ansible_arguments
    ansible_env_vars = local.ansible_vm_env_vars
  }
}
