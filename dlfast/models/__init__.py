"""The course notes' architectures, rebuilt from dlfast ops and layers (one file per family)."""
