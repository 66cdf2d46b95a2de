"""IP protection: clients tune without holding or seeing the model's weights (black-box
prompt tuning) or without the full model (offsite tuning against a layer-dropped emulator).
Importing registers the methods."""

from fedfm.trust.ip import fedbpt, offsite  # noqa: F401
