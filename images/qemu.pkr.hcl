# Target `qemu`: its variables and source (the build is in vm.pkr.hcl, shared with the
# clouds). The build VM boots a copy of gpubake's own Debian base disk
# (gpubake.build.vm_disk: mmdebstrap, no keys, a login key taken from QEMU's fw_cfg) under
# QEMU, KVM where it runs a guest, else software emulation (TCG). The image is the qcow2
# Packer leaves in the output directory once the sealed VM has powered itself off; gpubake
# then writes the raw disk and GCP's disk.raw tar.gz beside it.

variable "qemu_base_disk" {
  type        = string
  description = "The qcow2 base disk the build VM boots a copy of (gpubake makes it: ~/.cache/gpubake/vm-base)."
  default     = ""
}

variable "qemu_base_disk_sha256" {
  type        = string
  description = "SHA-256 of the base disk, checked by Packer before it copies the disk."
  default     = ""
}

variable "qemu_accelerator" {
  type        = string
  description = "kvm where this machine runs a KVM guest, tcg (software emulation, slow) otherwise."
  default     = "kvm"
}

variable "qemu_memory_mb" {
  type        = number
  description = "Memory of the build VM in MiB."
  default     = 2048
}

variable "qemu_cpus" {
  type        = number
  description = "Virtual CPUs of the build VM."
  default     = 2
}

variable "qemu_ssh_key_dir" {
  type        = string
  description = "Folder with the build's throwaway login key (id_ed25519, id_ed25519.pub); gpubake makes it in its work dir."
  default     = "ssh"
}

variable "qemu_output_dir" {
  type        = string
  description = "Where Packer writes the image (it must not exist yet)."
  default     = "output"
}

source "qemu" "gpubake" {
  iso_url          = var.qemu_base_disk
  iso_checksum     = "sha256:${var.qemu_base_disk_sha256}"
  disk_image       = true
  use_backing_file = false
  format           = "qcow2"
  disk_size        = "${var.disk_size_gb}G"
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  accelerator      = var.qemu_accelerator
  memory           = var.qemu_memory_mb
  cpus             = var.qemu_cpus
  headless         = true
  output_directory = var.qemu_output_dir
  vm_name          = "${var.image_name}.qcow2"
  qemuargs = [
    # the base disk's first-boot unit installs this key for the build user
    # (try: `packer validate` before the key is made)
    ["-fw_cfg", "name=opt/gpubake/authorized_key,string=${try(chomp(file("${var.qemu_ssh_key_dir}/id_ed25519.pub")), "")}"],
    ["-serial", "file:${var.qemu_output_dir}-serial.log"],
  ]
  ssh_username         = var.ssh_username
  ssh_private_key_file = "${var.qemu_ssh_key_dir}/id_ed25519"
  ssh_timeout          = "20m"
  # After the seal: the build user (the base disk's; the image's own is gpubake) and its
  # sudo rule go, then a clean power-off writes everything to the disk; Packer waits for
  # QEMU to exit (an empty command would make Packer halt the VM at once, losing what the
  # guest had not yet written)
  shutdown_command = "sudo -n sh -c 'rm -f /etc/sudoers.d/${var.ssh_username} && userdel --force --remove ${var.ssh_username} && sync && systemctl poweroff'"
  shutdown_timeout = "10m"
}
