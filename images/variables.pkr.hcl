# Variables every gpubake target shares. (Validation avoids regex(): Packer
# 1.6.6 evaluates it wrongly in validation blocks; gpubake checks strictly.) gpubake writes one var file per build
# (<target>.pkrvars.hcl); `gpubake render` leaves it beside these files.

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
