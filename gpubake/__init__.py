"""gpubake: tested GPU deep-learning images from one set of Ansible roles, through Packer."""

from pathlib import Path

__version__ = "0.1.0"

#: The repository (or installed source tree) holding images/, roles/, playbooks/.
ROOT = Path(__file__).resolve().parent.parent


class GpubakeError(Exception):
    """An error the user can fix; its message is one line saying what is wrong and how."""
