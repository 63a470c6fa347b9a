"""The wheel carries gpubake's data (images/, the collection, ansible.cfg) as gpubake/_data.

Everything else is in pyproject.toml; this only extends build_py, so that an installed
gpubake finds its roles and images without the checkout (gpubake/resources.py).
"""

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# one list, read from the module that finds the data at run time
DATA_ITEMS = runpy.run_path(str(ROOT / "gpubake" / "resources.py"))["DATA_ITEMS"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        dest = Path(self.build_lib) / "gpubake" / "_data"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for item in DATA_ITEMS:
            src = ROOT / item
            if src.is_dir():
                shutil.copytree(src, dest / item, ignore=IGNORE)
            else:
                shutil.copyfile(src, dest / item)


setup(cmdclass={"build_py": BuildPyWithData})
