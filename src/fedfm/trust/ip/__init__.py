"""IP protection: clients tune without holding or seeing the model's weights (black-box
prompt tuning). Importing registers the methods."""

from fedfm.trust.ip import fedbpt  # noqa: F401
