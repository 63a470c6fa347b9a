# Variables every gpubake target shares. (Validation avoids regex(): Packer
# 1.6.6 evaluates it wrongly in validation blocks; gpubake checks strictly.)
# `gpubake render --target T --out DIR` writes T's Packer files, its variables as
# T.auto.pkrvars.hcl (Packer loads it by itself), ansible-vars.json, ansible.cfg and
# the collection gpubake.gpu under collections/: `packer build .` in DIR needs no flags.

variable "stack" {
  type        = string
  description = "Name of the resolved gpubake stack (images/stacks.yml)."
  validation {
    condition     = length(var.stack) > 0 && lower(var.stack) == var.stack && length(split(" ", var.stack)) == 1
    error_message = "The stack name must be one lowercase word (letters, digits, dashes)."
  }
}

variable "input_hash" {
  type        = string
  description = "sha256 of everything the image is built from; stored as a label so that identical inputs are never built twice."
  validation {
    condition     = length(var.input_hash) == 64 && lower(var.input_hash) == var.input_hash
    error_message = "The input hash must be a sha256: 64 lowercase hex digits."
  }
}

variable "ansible_playbook_command" {
  type        = string
  description = "ansible-playbook to run (gpubake passes the one from its own environment)."
  default     = "ansible-playbook"
}

variable "ansible_extra_arguments" {
  type        = list(string)
  description = "Extra ansible-playbook arguments, e.g. [\"-v\"]."
  default     = []
}

locals {
  # The collection gpubake.gpu as rendered beside these files; its playbooks call the roles
  # by FQCN, so Ansible is pointed at the collection and at the rendered ansible.cfg.
  collection = "${path.root}/collections/ansible_collections/gpubake/gpu"
  ansible_env_vars = [
    "ANSIBLE_CONFIG=${path.root}/ansible.cfg",
    "ANSIBLE_COLLECTIONS_PATH=${path.root}/collections",
  ]
}
