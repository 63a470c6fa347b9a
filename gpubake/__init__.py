"""gpubake: tested GPU deep-learning images from one set of Ansible roles, through Packer."""

__version__ = "1.0.0"

# gpubake's data (images/, the collection gpubake.gpu, ansible.cfg) is found through
# gpubake.resources.data_root(), in a checkout and in an installed wheel alike.


class GpubakeError(Exception):
    """An error the user can fix; its message is one line saying what is wrong and how."""


def size_text(nbytes: float) -> str:
    """A byte count as messages show it: GB from 0.1 GB up, MB below."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def one_line(text: object) -> str:
    """`text` with each run of whitespace, line breaks included, one space: a message that
    quotes a server's or a tool's words stays one line."""
    return " ".join(str(text).split())
