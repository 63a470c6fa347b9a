"""Publishing and choosing images: the registry client (registry), push, pull and the
registry's index (images), which image fits a machine (machine, selection), and what an
image holds (scan, sbom)."""
